"""The GPU benchmark in one call: the bfloat16 matmul roof, then the train step of GPT-2 style ~125M
and ~350M models at context 1024 and 2048 in bfloat16 (configs/pretrain/gpt_bench.py), with MFU
against the roof measured in each run and against the H100's data-sheet dense bfloat16 peak.

python -m tools.gpu_bench [--json OUT] [--smoke]

Each measurement is one `python -m tools.bench` process, so each peak memory is its own; the table
at the end is read from their JSON figures. `--smoke` runs the same commands on the smoke variants
with a small roof and few steps: a check of the code paths on CPU, not a measurement.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

H100_BF16_PEAK = 989e12  # FLOP/s, dense bfloat16 (H100 SXM data sheet)
# (size, seq, attention): cuDNN's fused attention throughout, and XLA's at the bar's config for contrast.
RUNS = (
    ("350m", 2048, "cudnn"),
    ("350m", 2048, "xla"),
    ("125m", 1024, "cudnn"),
    ("125m", 2048, "cudnn"),
    ("350m", 1024, "cudnn"),
)
CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain", "gpt_bench.py"
)
COLUMNS = (
    ("tokens_per_sec", "tokens/s", 1.0),
    ("mfu", "MFU (measured roof)", 1.0),
    ("mfu_nominal", "MFU (989 TFLOP/s)", 1.0),
    ("peak_flops", "roof TFLOP/s", 1e-12),
    ("peak_memory_bytes", "peak memory GB", 1e-9),
)


def commands(json_path: str, smoke: bool) -> list:
    """The bench command lines: the bfloat16 roof, then one train bench per RUNS entry."""
    bench = [sys.executable, "-m", "tools.bench"]
    n, timing = (
        (["--matmul_n", "256"], ["--steps", "2", "--repeats", "2"]) if smoke else (["--matmul_n", "8192"], [])
    )
    out = [bench + ["matmul", "--dtype", "bfloat16", *n, "--json", json_path]]
    for size, seq, attention in RUNS:
        arg = f"size={size},seq={seq},attention={attention}" + (",smoke" if smoke else "")
        out.append(
            bench
            + [
                "train",
                "--config",
                f"{CONFIG}:{arg}",
                "--torch",
                "none",
                *n,
                *timing,
                "--nominal_peak",
                f"{H100_BF16_PEAK:g}",
                "--json",
                json_path,
            ]
        )
    return out


def summary(records: list) -> str:
    """A table with one row per train config from the bench's JSON records (matmul roof first)."""
    roofs = [r["value"] for r in records if r["bench"] == "matmul" and r["name"] == "peak_flops"]
    lines = [
        f"bfloat16 matmul roof: {roofs[0] / 1e12:.4g} TFLOP/s" if roofs else "matmul roof: failed",
        f"{'config':<44}" + "".join(f"{title:>22}" for _, title, _ in COLUMNS),
    ]
    configs = dict.fromkeys(r["config"] for r in records if r["bench"] == "train")
    for config in configs:
        values = {r["name"]: r["value"] for r in records if r["bench"] == "train" and r["config"] == config}
        cells = ["-" if values.get(k) is None else f"{values[k] * scale:.4g}" for k, _, scale in COLUMNS]
        lines.append(f"{os.path.basename(config):<44}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="bfloat16 roof and ~125M / ~350M train-step MFU on one GPU.")
    p.add_argument("--json", default=None, help="append the bench's JSON figures to this file")
    p.add_argument("--smoke", action="store_true", help="the smoke variants on any machine (a CPU check)")
    p.add_argument("--timeout", type=float, default=240, help="seconds allowed to each bench process")
    args = p.parse_args(argv)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "figures.jsonl")
        for cmd in commands(path, args.smoke):
            print("$ python " + " ".join(cmd[1:]), flush=True)
            try:
                failed += subprocess.run(cmd, timeout=args.timeout).returncode != 0
            except subprocess.TimeoutExpired:
                print(f"timed out after {args.timeout} s", flush=True)
                failed += 1
        records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print(summary(records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
