"""The language-model comparison of docs/LANGUAGE_MODELS.md: one table and one figure.

python -m tools.plot_lm --eval E1.json E2.json ... --ngram N1.json ... --baselines B.json \
    [--kshot K1.json ...] --out docs/lm/language_models.png

--eval      `tools.eval --bpb --json` files of trained workdirs: each a point at the run's training
            FLOPs (config.json's run.scaling.compute) and training seconds (the sum over logged
            intervals of their tokens over their tokens/s, so data preparation and evaluation are
            left out).
--ngram     `tools.ngram --json` files: horizontal lines.
--baselines `tools.baselines --json`-style output (unigram entropy, gzip -9, xz -9): horizontal lines.
--kshot     `tools.eval --kshot --json` files: score against k, one line per task and file.
Prints the markdown table (every row's held-out bits per byte) and writes the figure.
"""

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lm import metrics as metrics_lib  # noqa: E402


def run_point(eval_json: dict) -> dict:
    """{label, bits_per_byte, flops, train_seconds, params, kind} of one evaluated training workdir."""
    workdir = eval_json["workdir"]
    saved = metrics_lib.read_json(os.path.join(workdir, "config.json")) or {}
    run = saved.get("run", {})
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if "tokens_per_sec" in r and "tokens_seen" in r]
    seconds, seen = 0.0, 0.0
    for r in train:
        seconds += (r["tokens_seen"] - seen) / r["tokens_per_sec"]
        seen = r["tokens_seen"]
    kind = saved.get("model", {}).get("kind", "transformer")
    steps = saved.get("train", {}).get("steps")
    params = run.get("params")
    params = params.get("total") if isinstance(params, dict) else params  # a dict in older workdirs
    model = saved.get("model", {})
    shape = f"{model.get('num_layers')} x {model.get('d_model')}"
    name = "NNLM (Bengio et al. 2003)" if kind == "nnlm" else f"Transformer {shape}"
    return {
        "label": f"{name}, {steps} steps",
        "bits_per_byte": eval_json["bits_per_byte"],
        "flops": run.get("scaling", {}).get("compute"),
        "train_seconds": seconds,
        "params": params,
        "kind": kind,
    }


def reference_lines(ngram_jsons: list[dict], baselines: dict | None) -> list[tuple[str, float]]:
    """(label, held-out bits per byte) of the n-gram models and the baselines."""
    lines = [
        (f"Kneser-Ney {j['order']}-gram", j["bits_per_byte"])
        for j in sorted(ngram_jsons, key=lambda j: j["order"])
    ]
    if baselines:
        per_token = baselines["unigram_entropy"] / math.log(2) / baselines["bytes_per_token"]
        lines.append(("unigram entropy of the held-out split itself", per_token))
        lines.append(("gzip -9", baselines["gzip9_bits_per_byte"]))
        lines.append(("xz -9", baselines["xz9_bits_per_byte"]))
    return lines


def table(points: list[dict], lines: list[tuple[str, float]]) -> str:
    """Every row sorted by bits per byte, as markdown."""
    rows = [(p["label"], p["bits_per_byte"], p["flops"], p["train_seconds"], p["params"]) for p in points]
    rows += [(label, bpb, None, None, None) for label, bpb in lines]
    out = [
        "| model | held-out bits/byte | training FLOPs | training time | parameters |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, bpb, flops, seconds, params in sorted(rows, key=lambda r: -r[1]):
        f = f"{flops:.2e}" if flops else ""
        s = f"{seconds / 60:.1f} min" if seconds else ""
        n = f"{params:,}" if params else ""
        out.append(f"| {label} | {bpb:.3f} | {f} | {s} | {n} |")
    return "\n".join(out)


def figure(points: list[dict], lines: list[tuple[str, float]], kshots: list[dict], out: str) -> None:
    """Bits per byte against training FLOPs and against training time, reference lines across;
    and the k-shot curves when given."""
    panels = 3 if kshots else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, xlabel in (
        (axes[0], "flops", "training FLOPs"),
        (axes[1], "train_seconds", "training seconds (2 CPU cores)"),
    ):
        series = dict.fromkeys(p["label"].split(",")[0] for p in points)  # one line per model shape
        for name in series:
            mine = sorted(
                (p for p in points if p["label"].startswith(name + ",") and p[key]), key=lambda p: p[key]
            )
            if mine:
                ax.plot(
                    [p[key] for p in mine],
                    [p["bits_per_byte"] for p in mine],
                    marker="s" if mine[0]["kind"] == "nnlm" else "o",
                    label=name,
                )
        for i, (label, bpb) in enumerate(lines):
            ax.axhline(bpb, color=colors[(i + 2) % len(colors)], linestyle="--", linewidth=1, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="upper right", ncol=2)
    if kshots:
        ax = axes[2]
        for j in kshots:
            who = os.path.basename(os.path.normpath(j["workdir"]))
            for task, by_k in j["kshot"].items():
                ks = sorted((int(k), v) for k, v in by_k.items() if v is not None)
                ax.plot([k for k, _ in ks], [v for _, v in ks], marker="o", label=f"{who}: {task}")
        ax.set_xlabel("k (solved examples in the prompt)")
        ax.set_ylabel("greedy grader score, held-out prompts")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", nargs="*", default=[], help="tools.eval --bpb --json files")
    p.add_argument("--ngram", nargs="*", default=[], help="tools.ngram --json files")
    p.add_argument("--baselines", default="", help="tools.baselines output (JSON)")
    p.add_argument("--kshot", nargs="*", default=[], help="tools.eval --kshot --json files")
    p.add_argument("--out", required=True, help="the figure (.png)")
    args = p.parse_args(argv)
    load = lambda path: json.load(open(path))  # noqa: E731
    points = [run_point(load(f)) for f in args.eval]
    lines = reference_lines([load(f) for f in args.ngram], load(args.baselines) if args.baselines else None)
    print(table(points, lines))
    figure(points, lines, [load(f) for f in args.kshot], args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
