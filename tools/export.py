"""Export a trained workdir as a plain checkpoint: LoRA adapters merged into the base weights.

python -m tools.export --workdir runs/sft_lora --out runs/sft_lora_merged [--checkpoint auto|best|latest]
python -m tools.export --workdir runs/sft_lora --hf runs/sft_lora_hf [--checkpoint ...]
python -m tools.export --workdir runs/sft_lora --hf runs/sft_lora_peft --peft

With --out, the output is an ordinary workdir (config.json with lora.rank = 0, tokenizer,
checkpoints/<step>/) that tools.sample reads and that a later stage takes as config.init_from.
With --hf, it is a Hugging Face model directory (config.json of the gpt2, llama or qwen2 family,
model.safetensors in float32, the tokenizer files) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.

With --hf and --peft, a LoRA run's latest adapters stay apart from their base: OUT/base is the base
they were trained on (the run's init_from; QLoRA's NF4 kernels dequantised) as such a Hugging Face
directory, tokenizer included, and OUT/adapter a PEFT LoRA adapter (adapter_config.json,
adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base_model, OUT/adapter)` loads onto
it, with peft's lora_alpha / r equal to our alpha / rank. GPT-2's q/k/v adapters share its fused c_attn
module, at rank r times the number of them adapted (`hf.lora_state_dict`). Runs with
lora.modules_to_save export merged only.
"""

import argparse
import json
import os
import sys

import jax

from lm import checkpoint, hf, saved_model
from lm import metrics as metrics_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError, UserError

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


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


def peft_config(lora_section, ranks: dict, base_dir: str, family: str) -> dict:
    """adapter_config.json of a PEFT LoRA adapter: our rank and alpha, `ranks` ({module: rank} from
    `hf.lora_state_dict`) as target_modules, with a rank_pattern and alpha_pattern (keeping alpha /
    rank) where a module's rank differs."""
    r, alpha = int(lora_section.rank), float(lora_section.alpha)
    odd = {module: rank for module, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": os.path.abspath(base_dir),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(lora_section.dropout),
        "target_modules": sorted(ranks),
        "rank_pattern": odd,
        "alpha_pattern": {module: alpha * rank / r for module, rank in odd.items()},
        "bias": "none",
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D weights are [in, out]
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def write_peft(model: saved_model.SavedModel, adapters: dict, lora_section, out: str) -> str:
    """Writes out/base (the Hugging Face model of `model`, the plain base) and out/adapter (the PEFT
    LoRA adapter of `adapters`, unboxed as `lora.init_adapters` nests them); returns the family."""
    if tuple(lora_section.get("modules_to_save", ())):
        raise ConfigError(
            f"--peft: config.lora.modules_to_save={tuple(lora_section.modules_to_save)} is not exported "
            "as an adapter; export merged (--hf without --peft)"
        )
    from safetensors.numpy import save_file

    base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    family = export_hf_weights(model, base_dir)
    tokenizer_lib.write_hf_tokenizer(model.tokenizer, base_dir)
    state, ranks = hf.lora_state_dict(jax.device_get(adapters), model.model_cfg, family)
    os.makedirs(adapter_dir, exist_ok=True)
    save_file(state, os.path.join(adapter_dir, PEFT_WEIGHTS_FILE), {"format": "pt"})
    config = peft_config(lora_section, ranks, base_dir, family)
    metrics_lib.write_atomic(os.path.join(adapter_dir, PEFT_CONFIG_FILE), json.dumps(config, indent=2) + "\n")
    return family


def export_peft(workdir: str, out: str, which: str = "auto") -> str:
    """Writes a LoRA run's latest adapters as out/adapter (PEFT) over its base out/base; returns the
    family. Adapters live in checkpoints/ only (best/ keeps merged parameters)."""
    if which == "best":
        raise UserError(
            "--peft exports the adapters of checkpoints/ (best/ holds merged parameters): "
            "use --checkpoint latest"
        )
    model, adapters = saved_model.load_adapters(workdir)
    return write_peft(model, adapters, model.config.lora, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="an ordinary workdir")
    target.add_argument("--hf", help="a Hugging Face model directory")
    p.add_argument("--checkpoint", default="auto", choices=saved_model.CHOICES)
    p.add_argument(
        "--peft",
        action="store_true",
        help="with --hf: a LoRA run as HF_DIR/base and a PEFT adapter HF_DIR/adapter",
    )
    args = p.parse_args(argv)
    try:
        if args.peft:
            if not args.hf:
                raise UserError("--peft goes with --hf OUT (the base and adapter directories)")
            family = export_peft(args.workdir, args.hf, args.checkpoint)
            print(
                f"exported {args.workdir} -> {args.hf}/base (Hugging Face {family}), {args.hf}/adapter (PEFT)"
            )
            return 0
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
