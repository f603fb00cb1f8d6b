"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li and Liang 2021) on a frozen Transformer.

The model itself carries them (`lm.model.ModelConfig.prompt_length`, `prefix_length`): a soft
prompt 'prompt' [P, d_model] run ahead of every sequence, and per-layer key/value prefixes
'prefix_key', 'prefix_value' [num_layers, kv_heads, L, head_dim] that every query attends to (at
every layer, as P-tuning v2). A run trains only these arrays (`init_trainable`) on a frozen base
and `plain` puts them beside the base: the plain parameters a checkpoint, best/ and the sampler
use. With the reparameterisation (`prefix.reparam_hidden` > 0), the trained tree holds instead
Li and Liang's MLP and its input, 'prefix_reparam': {'embed' [L, d_model], 'wi' [d_model, h],
'bi' [h], 'wo' [h, 2 * layers * kv_heads * head_dim], 'bo'}, and `plain` computes the prefixes.

A fresh run starts the prefixes at the frozen model's own keys and values of real text and the
prompt at the embeddings of that text (`start_from_text`), as both papers recommend over random
values: the tuned model starts close to the base.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import sharding
from lm.errors import ConfigError
from lm.model import ModelConfig, Transformer, init_cache
from lm.sharding import EMBED, HEAD_DIM, KV_HEADS

PREFIX_KEYS = ("prefix_key", "prefix_value")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """prefix_length / prompt_length 0: off; reparam_hidden > 0: the prefix MLP's width."""

    prefix_length: int = 0
    prompt_length: int = 0
    reparam_hidden: int = 0

    @property
    def on(self) -> bool:
        return bool(self.prefix_length or self.prompt_length)

    def model_fields(self) -> dict:
        """The ModelConfig fields a run with these settings resolves."""
        return {"prefix_length": self.prefix_length, "prompt_length": self.prompt_length}


def from_config(config) -> PeftConfig:
    """`config.prefix` and `config.prompt_tuning` as a PeftConfig; ConfigError on bad values or
    beside LoRA (config.lora.rank)."""
    for key in (
        "prefix.length",
        "prefix.reparam_hidden",
        "prefix.lr",
        "prompt_tuning.length",
        "prompt_tuning.lr",
    ):
        section, name = key.split(".")
        if config[section][name] < 0:
            raise ConfigError(f"config.{key}={config[section][name]} must be >= 0")
    peft = PeftConfig(config.prefix.length, config.prompt_tuning.length, config.prefix.reparam_hidden)
    if peft.on and "lora" in config and config.lora.rank:
        raise ConfigError(
            f"config.lora.rank={config.lora.rank} with prefix or prompt tuning: train one of them at a time"
        )
    return peft


def check_positions(model_section, seq_len: int, peft: PeftConfig) -> None:
    """A soft prompt takes the first positions: with learned ones, it and config.train.seq_len
    must fit the model's max_seq_len (ConfigError)."""
    if model_section.positions == "learned" and peft.prompt_length + seq_len > model_section.max_seq_len:
        raise ConfigError(
            f"config.prompt_tuning.length={peft.prompt_length} + config.train.seq_len={seq_len} exceeds "
            f"the model's max_seq_len={model_section.max_seq_len} (its learned positions)"
        )


def learning_rate(config) -> float | None:
    """The peak learning rate of a prefix or prompt run (prefix.lr / prompt_tuning.lr; None: the
    optimizer's)."""
    lr = (
        config.prefix.lr
        if config.prefix.length
        else config.prompt_tuning.lr
        if config.prompt_tuning.length
        else 0
    )
    return lr or None


def init_trainable(rng, model_cfg: ModelConfig, peft: PeftConfig) -> dict:
    """The trained tree of a Transformer's parameters (boxed with logical axes), random: 'prompt'
    and the prefixes, or 'prefix_reparam' (see the module docstring)."""
    cfg = model_cfg
    keys = jax.random.split(rng, 5)
    box = nn.LogicallyPartitioned
    out = {}
    if peft.prompt_length:
        out["prompt"] = box(
            0.02 * jax.random.normal(keys[0], (peft.prompt_length, cfg.d_model)), (None, EMBED)
        )
    if peft.prefix_length and peft.reparam_hidden:
        h, width = peft.reparam_hidden, 2 * cfg.num_layers * cfg.kv_heads * cfg.head_size
        normal = lambda k, shape: jax.random.normal(k, shape) / math.sqrt(shape[0])  # noqa: E731
        out["prefix_reparam"] = {
            "embed": box(jax.random.normal(keys[1], (peft.prefix_length, cfg.d_model)), (None, EMBED)),
            "wi": box(normal(keys[2], (cfg.d_model, h)), (EMBED, None)),
            "bi": box(jnp.zeros((h,)), (None,)),
            "wo": box(normal(keys[3], (h, width)), (None, None)),
            "bo": box(jnp.zeros((width,)), (None,)),
        }
    elif peft.prefix_length:
        shape = (cfg.num_layers, cfg.kv_heads, peft.prefix_length, cfg.head_size)
        for name, key in zip(PREFIX_KEYS, keys[1:3]):
            out[name] = box(0.02 * jax.random.normal(key, shape), (None, KV_HEADS, None, HEAD_DIM))
    return out


def reparam_prefix(reparam: dict, model_cfg: ModelConfig) -> dict:
    """Li and Liang's MLP: {'prefix_key', 'prefix_value': [layers, kv_heads, L, head_dim]} from
    'prefix_reparam' = tanh(embed wi + bi) wo + bo."""
    cfg = model_cfg
    hidden = jnp.tanh(reparam["embed"] @ reparam["wi"] + reparam["bi"])  # [L, h]
    flat = hidden @ reparam["wo"] + reparam["bo"]  # [L, 2 * layers * kv_heads * head_dim]
    kv = flat.reshape(-1, 2, cfg.num_layers, cfg.kv_heads, cfg.head_size).transpose(1, 2, 3, 0, 4)
    return {"prefix_key": kv[0], "prefix_value": kv[1]}


def plain(base: dict, trainable: dict, model_cfg: ModelConfig) -> dict:
    """The Transformer parameters of the tuned model: the frozen `base` with the trained prompt
    and prefixes (computed from the MLP where reparameterised) beside it."""
    trainable = dict(trainable)
    if "prefix_reparam" in trainable:
        trainable.update(reparam_prefix(trainable.pop("prefix_reparam"), model_cfg))
    return {**base, **trainable}


def count(tree) -> int:
    """Number of values in a (boxed or plain) tree."""
    return sum(x.size for x in jax.tree.leaves(sharding.unboxed(tree)))


def start_from_text(trainable: dict, base: dict, model_cfg: ModelConfig, tokens) -> dict:
    """`trainable` (from `init_trainable`, unboxed) with the prompt set to the base's embeddings of
    `tokens` [n] int32 and the prefixes to the base's keys and values of them (layer by layer,
    positions 0..), both cut or cycled to their lengths; a reparameterised prefix stays random."""
    out = dict(trainable)
    if "prompt" in out:
        ids = jnp.resize(tokens, (out["prompt"].shape[0],))
        out["prompt"] = base["token_embed"]["embedding"][ids].astype(out["prompt"].dtype)
    if "prefix_key" in out:
        length = out["prefix_key"].shape[2]
        ids = jnp.resize(tokens, (1, length))
        plain_cfg = model_cfg.replace(prefix_length=0, prompt_length=0)
        cache = init_cache(plain_cfg, 1, length)
        _, cache = Transformer(plain_cfg).apply({"params": base}, ids, cache, method="prefill")
        for name, part in zip(PREFIX_KEYS, ("key", "value")):
            stacked = jnp.stack([layer[part][0] for layer in cache["layers"]])  # [layers, kvh, L, hd]
            out[name] = stacked.astype(out[name].dtype)
    return out
