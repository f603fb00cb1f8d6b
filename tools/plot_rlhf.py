"""Figures and tables of the RLHF stages, from the files the runs write.

  # mean ± sd over seeds of every report field, as a markdown table
  python -m tools.plot_rlhf table runs/recipe_s0/report.json runs/recipe_s1/report.json ...
  # oracle score against KL to SFT for every policy row (PPO, GRPO, DPO, best-of-n, the oracle rows)
  python -m tools.plot_rlhf frontier runs/recipe_s*/report.json --out docs/rlhf/frontier.png
  # reward over-optimisation: proxy (RM) and oracle score against sqrt(KL) over a PPO run, with
  # Gao et al.'s RL form fitted to both
  python -m tools.plot_rlhf overoptimisation runs/ppo_nokl --out docs/rlhf/overoptimisation.png

Gao et al. (2022), for RL: R(d) = d (alpha - beta log d), d = sqrt(KL to the initial policy), R the
score gain over d = 0. It is linear in (alpha, beta), fitted by least squares.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from lm import metrics as metrics_lib

POLICIES = ("ppo", "grpo", "dpo", "best_of_n", "ppo_oracle", "grpo_oracle")  # the report's policy rows


def read_reports(paths: list[str]) -> list[dict]:
    """The `stages` dicts of report.json files."""
    return [json.load(open(p))["stages"] for p in paths]


def mean_sd_table(reports: list[dict]) -> str:
    """A markdown table: one row per stage, `mean ± sd` over the reports of each numeric field."""
    stages = list(dict.fromkeys(s for r in reports for s in r))
    values = [(f, v) for r in reports for row in r.values() for f, v in row.items() if v is not None]
    fields = [
        f
        for f in dict.fromkeys(f for f, _ in values)
        if all(isinstance(v, (int, float)) for g, v in values if g == f)
    ]
    lines = [f"| stage (n = {len(reports)}) | " + " | ".join(fields) + " |", "|---|" + "---:|" * len(fields)]
    for stage in stages:
        cells = []
        for field in fields:
            values = [r[stage][field] for r in reports if stage in r and r[stage].get(field) is not None]
            cells.append(
                "–"
                if not values
                else f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_gao_rl(d: np.ndarray, gain: np.ndarray) -> dict:
    """Least-squares alpha, beta of gain = d (alpha - beta log d) over points with d > 0, and the d at
    which the fitted curve peaks (exp(alpha / beta - 1), when beta > 0)."""
    keep = d > 0
    design = np.stack([d[keep], -d[keep] * np.log(d[keep])], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(design, gain[keep], rcond=None)
    peak = math.exp(alpha / beta - 1) if beta > 0 else None
    residual = gain[keep] - design @ np.array([alpha, beta])
    return {
        "alpha": float(alpha),
        "beta": float(beta),
        "peak_sqrt_kl": peak,
        "rmse": float(np.sqrt(np.mean(residual**2))),
    }


def overoptimisation_curve(run_dir: str) -> dict:
    """sqrt(KL), proxy (rm_score) and oracle score of every logged PPO step, with their Gao fits."""
    rows = [
        r
        for r in metrics_lib.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        if {"kl", "rm_score", "oracle_score"} <= set(r)
    ]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl: no PPO rows with kl, rm_score and oracle_score")
    d = np.sqrt(np.maximum([r["kl"] for r in rows], 0.0))
    proxy, oracle = np.array([r["rm_score"] for r in rows]), np.array([r["oracle_score"] for r in rows])
    return {
        "step": [r["step"] for r in rows],
        "sqrt_kl": d.tolist(),
        "proxy": proxy.tolist(),
        "oracle": oracle.tolist(),
        "fit_proxy": fit_gao_rl(d, proxy - proxy[0]),
        "fit_oracle": fit_gao_rl(d, oracle - oracle[0]),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(reports: list[dict], out: str) -> None:
    """Oracle score (greedy) against kl_to_sft, one marker per policy and report; SFT at KL 0."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    sft = [r["sft"]["oracle_score"] for r in reports if "sft" in r]
    ax.scatter([0.0] * len(sft), sft, marker="s", color="black", label="SFT")
    for name, marker in zip(POLICIES, "o^DvPX"):
        points = [
            (r[name]["kl_to_sft"], r[name]["oracle_score"])
            for r in reports
            if name in r and r[name].get("kl_to_sft") is not None
        ]
        if points:
            ax.scatter(*zip(*points), marker=marker, label=name)
    ax.set_xlabel("KL to SFT (nats)")
    ax.set_ylabel("oracle score (greedy)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_overoptimisation(curve: dict, out: str) -> None:
    """Proxy and oracle score against sqrt(KL), points and fitted Gao curves."""
    plt = _pyplot()
    d = np.array(curve["sqrt_kl"])
    grid = np.linspace(max(d.min(), 1e-3), d.max(), 200)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, color in (("proxy", "tab:blue"), ("oracle", "tab:red")):
        values = np.array(curve[key])
        fit = curve[f"fit_{key}"]
        ax.scatter(d, values - values[0], s=12, color=color, label=f"{key} gain")
        ax.plot(
            grid,
            grid * (fit["alpha"] - fit["beta"] * np.log(grid)),
            color=color,
            alpha=0.7,
            label=f"fit: α={fit['alpha']:.3f}, β={fit['beta']:.3f}",
        )
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("sqrt(KL to SFT) (sqrt nats)")
    ax.set_ylabel("score gain over the start")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table")
    table.add_argument("reports", nargs="+")
    frontier = sub.add_parser("frontier")
    frontier.add_argument("reports", nargs="+")
    frontier.add_argument("--out", required=True)
    over = sub.add_parser("overoptimisation")
    over.add_argument("run_dir")
    over.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "table":
        print(mean_sd_table(read_reports(args.reports)))
    elif args.command == "frontier":
        plot_frontier(read_reports(args.reports), args.out)
        print(f"wrote {args.out}")
    else:
        curve = overoptimisation_curve(args.run_dir)
        plot_overoptimisation(curve, args.out)
        metrics_lib.write_json_atomic(os.path.splitext(args.out)[0] + ".json", curve)
        print(json.dumps({k: curve[k] for k in ("fit_proxy", "fit_oracle")}))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
