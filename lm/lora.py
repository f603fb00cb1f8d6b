"""LoRA (Hu et al. 2021, arXiv:2106.09685) and QLoRA on the unchanged `lm.model.Transformer`.

A targeted dense layer `y = x W (+ b)` becomes `y = x W (+ b) + dropout(x) A B * alpha / rank`,
with W frozen and only A and B trained. The model code is not touched: `adapted` intercepts
`lm.model.Linear.__call__` (`flax.linen.intercept_methods`) and reads a layer's adapter from the
'lora' variable collection at that layer's own path, which Flax resolves, also inside lifted
transforms such as `nn.remat`. A frozen kernel may be an `lm.quant.NF4Tensor` (QLoRA): the
interceptor dequantises it at use, inside the jitted forward.

Adapters mirror the Linear paths of the parameters, e.g.
`{'layers_0': {'attn': {'query': {'a': [d_model, r], 'b': [r, heads, head_dim]}}}}`.
A keeps the kernel's input axes and B its output axes, with their logical names, so adapters
shard by the same axis rules as the model; the rank axis is never sharded.

`modules_to_save` (PEFT's name) lists top-level modules outside the blocks ('token_embed',
'pos_embed', 'ln_final', 'lm_head') trained in full beside the adapters: their trained copy sits
in the same tree at its own key and replaces the frozen one. A model pretrained on other text
needs this to move its (tied) token embeddings towards the new data's tokens, which no adapter
inside the blocks can do.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import meta

from lm.errors import ConfigError
from lm.model import Linear
from lm.quant import NF4Tensor, dequantize, quantize_params

COLLECTION = "lora"
# Leading kernel axes that are the layer's input, by Linear name (`lm.model`): the attention
# output projection's kernel is [heads, head_dim, d_model]; every other one has one input axis.
INPUT_AXES = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_gate": 1, "wi_up": 1, "wo": 1}
# Top-level modules of `lm.model.Transformer` outside the blocks, which can be trained in full.
SAVABLE_MODULES = ("token_embed", "pos_embed", "ln_final", "lm_head")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank 0 turns LoRA off (full fine-tuning); `targets` are Linear names from INPUT_AXES;
    `modules_to_save` are names from SAVABLE_MODULES trained in full."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("query", "key", "value", "out")
    modules_to_save: tuple = ()

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora rank={self.rank} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(INPUT_AXES))
        if unknown:
            raise ConfigError(f"lora targets has {unknown}, not among {sorted(INPUT_AXES)}")
        unknown = sorted(set(self.modules_to_save) - set(SAVABLE_MODULES))
        if unknown:
            raise ConfigError(f"lora modules_to_save has {unknown}, not among {list(SAVABLE_MODULES)}")

    @property
    def scale(self) -> float:
        """alpha / rank, the factor on A B."""
        return self.alpha / self.rank


def is_linear_kernel(path: tuple, leaf=None) -> bool:
    """Whether a parameter path is the kernel of a Linear layer (what QLoRA quantises)."""
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] in INPUT_AXES


def _kernel_info(leaf) -> tuple[tuple, Any]:
    """(shape, logical names or None) of a kernel that is an array, a box or an NF4Tensor."""
    names = leaf.names if isinstance(leaf, nn.LogicallyPartitioned) else None
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    return tuple(value.shape), names


def init_adapters(rng: jax.Array, base_params, lora_cfg: LoraConfig):
    """The trainable tree: adapters for every targeted Linear kernel of `base_params`, and the
    base's own `modules_to_save`; {} when rank is 0.

    A [*in_shape, r] is normal with std 1 / sqrt(prod(in_shape)) and B [r, *out_shape] is zero,
    so the adapted model starts equal to the base. Adapters are float32. When the base kernels are
    `nn.LogicallyPartitioned` (from `model.init` or `jax.eval_shape` of it), A and B are too, with
    names (*kernel input names, None) and (None, *kernel output names); plain kernels (arrays,
    abstract arrays or NF4Tensors) give plain adapters. A saved module is `base_params[name]`
    itself, or zeros of its shape when the base is abstract (`copy_saved_modules` fills it in).

    Args:
      rng: a PRNG key.
      base_params: the model's params (nested dict), boxed or not.
    Returns:
      {path...: {'a': A, 'b': B}} nested like `base_params`, plus {name: module params}.
    """
    if lora_cfg.rank == 0:
        return {}
    flat = traverse_util.flatten_dict(base_params)
    paths = [p[:-1] for p in flat if is_linear_kernel(p) and p[-2] in lora_cfg.targets]
    out = {}
    for key, path in zip(jax.random.split(rng, max(len(paths), 1)), paths):
        shape, names = _kernel_info(flat[path + ("kernel",)])
        k = INPUT_AXES[path[-1]]
        a = jax.random.normal(key, shape[:k] + (lora_cfg.rank,)) / math.sqrt(math.prod(shape[:k]))
        b = jnp.zeros((lora_cfg.rank,) + shape[k:])
        if names is not None:
            a = nn.LogicallyPartitioned(a, tuple(names[:k]) + (None,))
            b = nn.LogicallyPartitioned(b, (None,) + tuple(names[k:]))
        out[path + ("a",)], out[path + ("b",)] = a, b
    missing = [name for name in lora_cfg.modules_to_save if name not in base_params]
    if missing:
        raise ConfigError(
            f"config.lora.modules_to_save names {missing}: the model has no such module "
            f"(it has {sorted(k for k in base_params if k in SAVABLE_MODULES)})"
        )
    placeholder = lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x
    saved = {name: jax.tree.map(placeholder, base_params[name]) for name in lora_cfg.modules_to_save}
    return {**traverse_util.unflatten_dict(out), **saved}


def copy_saved_modules(trainable, base_params, lora_cfg: LoraConfig):
    """`trainable` with its saved modules set to the base's values (the start of a LoRA run)."""
    return {**trainable, **{name: base_params[name] for name in lora_cfg.modules_to_save}}


def split_trainable(trainable, lora_cfg: LoraConfig) -> tuple:
    """(adapters, saved modules) of a trainable tree from `init_adapters`."""
    saved = set(lora_cfg.modules_to_save)
    return (
        {k: v for k, v in trainable.items() if k not in saved},
        {k: v for k, v in trainable.items() if k in saved},
    )


def trainable_count(adapters) -> int:
    """Number of trainable adapter values."""
    return sum(x.size for x in jax.tree.leaves(meta.unbox(adapters)))


def _dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _base_linear(module: Linear, x: jax.Array, kernel: NF4Tensor) -> jax.Array:
    """What `Linear.__call__` computes, with the kernel dequantised from NF4 at use."""
    cfg = module.config
    n_in, n_out = math.prod(module.in_shape), math.prod(module.out_shape)
    w = dequantize(kernel, cfg.compute_dtype).reshape(n_in, n_out)
    y = jnp.dot(x.astype(cfg.compute_dtype), w)
    if cfg.use_bias:
        y = y + module.get_variable("params", "bias").reshape(n_out).astype(cfg.compute_dtype)
    return y


def _lora_delta(module: Linear, x: jax.Array, lora_cfg: LoraConfig, deterministic: bool):
    """dropout(x) A B * alpha / r for x [tokens, n_in] -> [tokens, n_out] in the compute dtype."""
    dtype = module.config.compute_dtype
    a, b = module.get_variable(COLLECTION, "a"), module.get_variable(COLLECTION, "b")
    if a.shape[:-1] != tuple(module.in_shape):
        raise ValueError(f"adapter A {a.shape} at {module.path} does not fit in_shape {module.in_shape}")
    rank = a.shape[-1]
    x = x.astype(dtype)
    if not deterministic and lora_cfg.dropout > 0:
        x = _dropout(x, lora_cfg.dropout, module.make_rng("dropout"))
    h = jnp.dot(x, a.reshape(-1, rank).astype(dtype))  # [tokens, r]
    return jnp.dot(h, b.reshape(rank, -1).astype(dtype)) * jnp.asarray(lora_cfg.scale, dtype)


def adapted(lora_cfg: LoraConfig, deterministic: bool = True):
    """A context in which every `Linear` call adds its LoRA term and dequantises NF4 kernels.

    Applies to modules run with a 'lora' collection (`{'a', 'b'}` at a Linear's path) and/or NF4
    kernels in 'params'; other Linear layers run unchanged. With deterministic=False and a
    dropout rate, the LoRA input dropout draws from the 'dropout' rng stream.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, Linear) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        kernel = module.get_variable("params", "kernel")
        has_adapter = module.has_variable(COLLECTION, "a")
        if not isinstance(kernel, NF4Tensor) and not has_adapter:
            return next_fun(*args, **kwargs)
        (x,) = args
        y = _base_linear(module, x, kernel) if isinstance(kernel, NF4Tensor) else next_fun(x)
        if has_adapter:
            y = y + _lora_delta(module, x, lora_cfg, deterministic)
        return y

    return nn.intercept_methods(interceptor)


def apply(
    model: nn.Module,
    base_params,
    adapters,
    lora_cfg: LoraConfig,
    tokens: jax.Array,
    *,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    **kwargs,
):
    """The adapted model's forward pass; jittable, differentiable w.r.t. `adapters`.

    Args:
      model: an `lm.model.Transformer` (any module built from `lm.model.Linear`).
      base_params: frozen params (unboxed); Linear kernels may be `NF4Tensor`s.
      adapters: the trainable tree from `init_adapters` (unboxed); its saved modules replace
        the base's.
      tokens: [batch, seq] int32.
      rng: the dropout key, needed when deterministic=False.
      kwargs: the rest of the model's call (positions, segment_ids, cache).
    Returns:
      whatever the model returns: logits [batch, seq, vocab] float32 (and a cache if given one).
    """
    adapters, saved = split_trainable(adapters, lora_cfg)
    variables = {"params": {**base_params, **saved}, COLLECTION: adapters}
    rngs = None if deterministic else {"dropout": rng}
    with adapted(lora_cfg, deterministic):
        return model.apply(variables, tokens, deterministic=deterministic, rngs=rngs, **kwargs)


def merge(base_params, adapters, lora_cfg: LoraConfig):
    """Plain float params, W + A B * alpha / r per adapter and NF4 kernels dequantised.

    What an exporter saves as an ordinary checkpoint: `model.apply({'params': merge(...)}, ...)`
    equals `apply(model, base_params, adapters, ...)`. Kernels keep their shape and dtype.
    """
    adapters, saved = split_trainable(adapters, lora_cfg)
    flat = traverse_util.flatten_dict({**base_params, **saved})
    flat = {p: dequantize(v) if isinstance(v, NF4Tensor) else v for p, v in flat.items()}
    pieces = traverse_util.flatten_dict(adapters)
    for layer in {path[:-1] for path in pieces}:
        a, b = pieces[layer + ("a",)], pieces[layer + ("b",)]
        kernel = flat[layer + ("kernel",)]
        rank = a.shape[-1]
        delta = (
            jnp.dot(a.reshape(-1, rank).astype(jnp.float32), b.reshape(rank, -1).astype(jnp.float32))
            * lora_cfg.scale
        )
        flat[layer + ("kernel",)] = (kernel + delta.reshape(kernel.shape)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def from_config(lora_section) -> LoraConfig:
    """`config.lora` (rank, alpha, dropout, targets, quantize) as a LoraConfig; ConfigError on bad values."""
    if lora_section.quantize not in ("", "nf4"):
        raise ConfigError(f"config.lora.quantize={lora_section.quantize!r}: expected '' or 'nf4'")
    if lora_section.quantize and not lora_section.rank:
        raise ConfigError(
            "config.lora.quantize='nf4' needs config.lora.rank > 0 (QLoRA trains adapters only)"
        )
    return LoraConfig(
        rank=lora_section.rank,
        alpha=lora_section.alpha,
        dropout=lora_section.dropout,
        targets=tuple(lora_section.targets),
        modules_to_save=tuple(lora_section.get("modules_to_save", ())),
    )


def stored_base(base_params, lora_section):
    """The frozen base as a run with `config.lora` keeps it: Linear kernels in NF4 for QLoRA
    (quantize 'nf4'), else unchanged."""
    if lora_section.quantize == "nf4":
        return quantize_params(base_params, is_linear_kernel, double_quant=lora_section.double_quant)
    return base_params
