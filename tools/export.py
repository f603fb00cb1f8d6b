"""Export a trained workdir as a plain checkpoint: LoRA adapters merged into the base weights.

python -m tools.export --workdir runs/sft_lora --out runs/sft_lora_merged [--checkpoint auto|best|latest]

The output is an ordinary workdir (config.json with lora.rank = 0, tokenizer, checkpoints/<step>/)
that tools.sample reads and that a later stage takes as config.init_from.
"""

import argparse
import os
import sys

from lm import checkpoint, saved_model
from lm import metrics as metrics_lib
from lm.errors import UserError


def export(workdir: str, out: str, which: str = "auto") -> str:
    """Writes the plain parameters of `workdir` to the workdir `out`; returns the checkpoint path."""
    model = saved_model.load(workdir, which)
    config = model.config
    if "lora" in config:
        config.lora.rank, config.lora.quantize = 0, ""
    _, run = saved_model.read_config(workdir)
    os.makedirs(out, exist_ok=True)
    model.tokenizer.save(os.path.join(out, "tokenizer"))
    metrics_lib.write_json_atomic(
        os.path.join(out, "config.json"), {**config.to_dict(), "run": {**run, "exported_from": model.source}}
    )
    step = checkpoint.latest_step_in(model.source)
    mngr = checkpoint.manager(out, keep=1)
    checkpoint.save(
        mngr, step, {"params": model.params}, {"config": config.to_dict(), "exported_from": model.source}
    )
    return os.path.join(out, "checkpoints", str(step))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default="auto", choices=saved_model.CHOICES)
    args = p.parse_args(argv)
    try:
        path = export(args.workdir, args.out, args.checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
