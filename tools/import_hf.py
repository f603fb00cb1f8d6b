"""Import a Hugging Face model directory (GPT-2, Llama, Mistral or Qwen2; safetensors) as a workdir.

python -m tools.import_hf HF_DIR --workdir OUT

OUT is an ordinary workdir: config.json (a pretraining config holding the model, "run" saying where
it came from), the tokenizer, and checkpoints/0/ holding the parameters. tools.sample reads it and
a later stage takes it as config.init_from (`--config.init_from=hf:HF_DIR` imports on the fly).
"""

import argparse
import os
import sys

import jax.numpy as jnp

from configs import common
from lm import checkpoint, hf
from lm import metrics as metrics_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import UserError
from lm.model import ModelConfig

DONE_FILE = "config.json"  # written last: a workdir that has it is a complete import


def workdir_config(model_fields: dict, max_seq_len: int):
    """A pretraining config holding `model_fields` (float32 parameters and compute)."""
    config = common.pretrain_config()
    for key, value in model_fields.items():
        config.model[key] = value
    config.train.seq_len = min(config.train.seq_len, max_seq_len)
    config.precision.param_dtype = config.precision.compute_dtype = "float32"
    return config


def write_workdir(hf_dir: str, workdir: str, tokenizer) -> str:
    """Imports `hf_dir` into `workdir` with `tokenizer` (any lm.data.tokenizer kind, saved as
    workdir/tokenizer); returns the checkpoint directory."""
    hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
    model_cfg, params, hf_cfg = hf.load(hf_dir)
    fields = hf.model_fields(hf_cfg)
    config = workdir_config(fields, model_cfg.max_seq_len)
    run = {
        "imported_from": hf_dir,
        "hf_model_type": hf_cfg["model_type"],
        "hf_generation_ids": hf.generation_ids(hf_cfg),
    }
    return save_workdir(workdir, config, params, tokenizer, run)


def save_workdir(workdir: str, config, params: dict, tokenizer, run: dict) -> str:
    """Writes a workdir tools.sample and tools.export read: `tokenizer`, `params` (nested numpy or
    jax arrays of `config.model`) as checkpoint 0, then config.json with `run`; returns the
    checkpoint directory."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(os.path.join(workdir, "tokenizer"))
    mngr = checkpoint.manager(workdir, keep=1)
    state = {"params": jax_tree(params)}
    checkpoint.save(mngr, 0, state, {"config": config.to_dict(), **run})
    metrics_lib.write_json_atomic(
        os.path.join(workdir, DONE_FILE), {**config.to_dict(), "resolved": {}, "run": run}
    )
    return os.path.join(workdir, "checkpoints", "0")


def jax_tree(params: dict) -> dict:
    """The nested numpy params as jax arrays."""
    return {k: jax_tree(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in params.items()}


def import_hf(hf_dir: str, workdir: str) -> str:
    """Imports `hf_dir` (its weights and its tokenizer) into `workdir`; returns the checkpoint directory."""
    ModelConfig(**hf.model_fields(hf.read_config(hf_dir)))  # config errors before the tokenizer's
    return write_workdir(hf_dir, workdir, tokenizer_lib.hf_tokenizer_from_dir(hf_dir))


def resolve_init_from(init_from: str, workdir: str) -> str:
    """`init_from` itself, or for 'hf:HF_DIR' the workdir `workdir`/hf_import it is imported into
    (once: a complete import there is reused)."""
    if not init_from.startswith("hf:"):
        return init_from
    target = os.path.join(workdir, "hf_import")
    if not os.path.exists(os.path.join(target, DONE_FILE)):
        import_hf(init_from[len("hf:") :], target)
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir")
    p.add_argument("--workdir", required=True)
    args = p.parse_args(argv)
    try:
        path = import_hf(args.hf_dir, args.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"imported {args.hf_dir} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
