"""A trained workdir as a plain model: parameters (LoRA merged), model config, tokenizer, config.

Which parameters: 'best' (workdir/best/, kept by SFT and later stages; already plain), 'latest'
(the newest checkpoint in workdir/checkpoints/; LoRA adapters are merged into the frozen base they
were trained on, re-quantised to NF4 first for QLoRA so the merge is the function that was trained),
or 'auto' (best when there is one, else latest). Everything lands on one device.
"""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import checkpoint, lora, sharding
from lm.data.tokenizer import Tokenizer, load_tokenizer
from lm.errors import CheckpointError, UserError
from lm.model import ModelConfig, Transformer

CHOICES = ("auto", "best", "latest")


@dataclasses.dataclass
class SavedModel:
    params: dict
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    source: str  # the checkpoint directory the parameters came from


def read_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(config without its "run" section, the "run" section) of a training workdir."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--workdir {workdir}: no config.json (not a training workdir?)")
    with open(path) as f:
        saved = json.load(f)
    run = saved.pop("run", {})
    return ml_collections.ConfigDict(saved), run


def _abstract_params(model: Transformer, config, mesh):
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    shardings = sharding.tree_shardings(boxed, mesh, sharding.axis_rules(config.axis_rules))
    return boxed, checkpoint.abstract_like(sharding.unboxed(boxed), shardings)


def _merged_latest(workdir: str, config, run: dict, model: Transformer, mesh):
    """Base (from the run's init_from) + the latest adapters, merged."""
    lora_cfg = lora.from_config(config.lora)
    boxed, abstract = _abstract_params(model, config, mesh)
    base = lora.stored_base(checkpoint.restore_params(run.get("init_from") or config.init_from, abstract),
                            config.lora)
    adapters_boxed = jax.eval_shape(lambda: lora.init_adapters(jax.random.PRNGKey(0), boxed, lora_cfg))
    adapter_shardings = sharding.tree_shardings(adapters_boxed, mesh, sharding.axis_rules(config.axis_rules))
    adapters = checkpoint.restore_params(
        workdir, checkpoint.abstract_like(sharding.unboxed(adapters_boxed), adapter_shardings))
    return lora.merge(base, adapters, lora_cfg)


def load(workdir: str, which: str = "auto") -> SavedModel:
    """The plain parameters of `workdir` ('auto' | 'best' | 'latest'), on the first device."""
    from lm.tasks.pretrain import model_config  # the one place config -> ModelConfig lives
    if which not in CHOICES:
        raise UserError(f"--checkpoint={which!r}: expected one of {CHOICES}")
    config, run = read_config(workdir)
    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        config.model.attention = "xla"  # the same model; cuDNN's kernel runs on NVIDIA GPUs only
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model_cfg = model_config(config, tokenizer.vocab_size)
    model = Transformer(model_cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    best = os.path.join(workdir, "best")
    if which == "auto":
        which = "best" if os.path.isdir(best) and any(d.isdigit() for d in os.listdir(best)) else "latest"
    lora_rank = config.lora.rank if "lora" in config else 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(config.axis_rules)):
        if which == "latest" and lora_rank:
            params = _merged_latest(workdir, config, run, model, mesh)
        else:
            source = best if which == "best" else workdir
            if which == "best" and not os.path.isdir(best):
                raise CheckpointError(f"{workdir}: no best/ checkpoint (only SFT and later stages keep one)")
            params = checkpoint.restore_params(source, _abstract_params(model, config, mesh)[1])
    return SavedModel(params=params, model_cfg=model_cfg, tokenizer=tokenizer, config=config,
                      source=best if which == "best" else os.path.join(workdir, "checkpoints"))
