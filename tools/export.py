"""Export a trained workdir as a plain checkpoint: LoRA adapters merged into the base weights.

python -m tools.export --workdir runs/sft_lora --out runs/sft_lora_merged [--checkpoint auto|best|latest]
python -m tools.export --workdir runs/sft_lora --hf runs/sft_lora_hf [--checkpoint ...]

With --out, the output is an ordinary workdir (config.json with lora.rank = 0, tokenizer,
checkpoints/<step>/) that tools.sample reads and that a later stage takes as config.init_from.
With --hf, it is a Hugging Face model directory (config.json of the gpt2, llama or qwen2 family,
model.safetensors in float32, the tokenizer files) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

import argparse
import os
import sys

import jax

from lm import checkpoint, hf, saved_model
from lm import metrics as metrics_lib
from lm.data import tokenizer as tokenizer_lib
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


def generation_ids(tokenizer) -> dict:
    """{bos_token_id, eos_token_id, pad_token_id} of a tokenizer (those it has, >= 0)."""
    ids = {"bos_token_id": "bos_id", "eos_token_id": "eos_id", "pad_token_id": "pad_id"}
    values = {key: getattr(tokenizer, attr, None) for key, attr in ids.items()}
    return {key: int(v) for key, v in values.items() if v is not None and v >= 0}


def export_hf_weights(model: saved_model.SavedModel, out: str) -> str:
    """Writes config.json and model.safetensors of a loaded model to `out`; returns its HF family."""
    hf.family_of(model.model_cfg)  # a ConfigError before anything is written
    return hf.save(out, jax.device_get(model.params), model.model_cfg, generation_ids(model.tokenizer))


def export_hf(workdir: str, out: str, which: str = "auto") -> str:
    """Writes `workdir` (LoRA merged) as a Hugging Face model directory `out`; returns its family."""
    model = saved_model.load(workdir, which)
    family = export_hf_weights(model, out)
    tokenizer_lib.write_hf_tokenizer(model.tokenizer, out)
    return family


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="an ordinary workdir")
    target.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--checkpoint", default="auto", choices=saved_model.CHOICES)
    args = p.parse_args(argv)
    try:
        if args.hf:
            family = export_hf(args.workdir, args.hf, args.checkpoint)
            print(f"exported {args.workdir} -> {args.hf} (Hugging Face {family})")
            return 0
        path = export(args.workdir, args.out, args.checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
