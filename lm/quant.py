"""NF4 4-bit weight storage (QLoRA: Dettmers et al. 2023, arXiv:2305.14314).

A float array is flattened and cut into blocks of 64 values; each block is divided by its absolute
maximum (its scale) and every value is replaced by the index of the nearest of the 16 NF4 code
values, two 4-bit indices per byte (first value in the high nibble, as bitsandbytes packs them).
Storage is 0.5 byte per value plus one float32 scale per 64 values: 0.5625 bytes per parameter.

Double quantisation (the paper's section 3) also compresses the scales: their mean is subtracted
and the centred scales are stored as int8 in blocks of 256, each block with one float32 absmax,
about 0.516 bytes per parameter in all. The paper (and bitsandbytes) store these second-level
values in an 8-bit dynamic float code; here they are linear int8, which takes the same bytes and,
for centred scales spread evenly over their range, has the finer step near each block's maximum.

Everything here is jittable, so dequantisation runs inside the jitted forward pass.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct, traverse_util
from flax.core import meta

# The NF4 code values, as in bitsandbytes (csrc/kernels.cu) and the QLoRA paper's appendix.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
BLOCK = 64  # values per NF4 scale
SCALE_BLOCK = 256  # scales per second-level float32 scale (double quantisation)


@struct.dataclass
class Int8Scales:
    """Double-quantised block scales: `offset + codes * absmax / 127`, per block of 256.

    codes: [n_super * 256] int8; absmax: [n_super] float32; offset: [] float32 (mean scale).
    """

    codes: jax.Array
    absmax: jax.Array
    offset: jax.Array


@struct.dataclass
class NF4Tensor:
    """A float array of `shape` stored as packed NF4 codes and per-block scales.

    packed: [n_blocks * 32] uint8, two codes per byte; scales: [n_blocks] float32 or `Int8Scales`
    where n_blocks = ceil(prod(shape) / 64). `dtype` is the original dtype (the default of
    `dequantize`).
    """

    packed: jax.Array
    scales: Any
    shape: tuple = struct.field(pytree_node=False)
    dtype: Any = struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays (codes and scales)."""
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def size(self) -> int:
        """Number of values of the original array."""
        return math.prod(self.shape)


def _code() -> jax.Array:
    return jnp.asarray(NF4_CODE, jnp.float32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """Flattens and zero-pads `x` to [n_blocks, block] float32."""
    flat = x.reshape(-1).astype(jnp.float32)
    return jnp.pad(flat, (0, -flat.size % block)).reshape(-1, block)


def nearest_code(normalised: jax.Array) -> jax.Array:
    """Index (uint8) of the nearest NF4 value for each entry of an array in [-1, 1]."""
    code = _code()
    midpoints = (code[1:] + code[:-1]) / 2
    return jnp.searchsorted(midpoints, normalised, side="left").astype(jnp.uint8)


def _quantize_scales(scales: jax.Array) -> Int8Scales:
    """[n_blocks] float32 -> Int8Scales (mean removed, linear int8 per block of 256)."""
    offset = jnp.mean(scales)
    blocks = _blocks(scales - offset, SCALE_BLOCK)  # [n_super, 256]
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    codes = jnp.round(blocks / safe[:, None] * 127).astype(jnp.int8)
    return Int8Scales(codes=codes.reshape(-1), absmax=absmax, offset=offset)


def _dequantize_scales(scales, n_blocks: int) -> jax.Array:
    """float32 scales [n_blocks], from either storage."""
    if not isinstance(scales, Int8Scales):
        return scales
    codes = scales.codes.reshape(-1, SCALE_BLOCK).astype(jnp.float32)
    values = codes * (scales.absmax[:, None] / 127) + scales.offset
    return values.reshape(-1)[:n_blocks]


def quantize(x: jax.Array, double_quant: bool = False) -> NF4Tensor:
    """Stores `x` (any shape, float) as NF4 in blocks of 64; optionally double-quantises scales."""
    blocks = _blocks(x, BLOCK)  # [n_blocks, 64]
    scales = jnp.max(jnp.abs(blocks), axis=1)  # [n_blocks]
    safe = jnp.where(scales > 0, scales, 1.0)
    idx = nearest_code(blocks / safe[:, None]).reshape(-1, 2)  # [n_blocks * 32, 2]
    packed = (idx[:, 0] << 4) | idx[:, 1]
    stored = _quantize_scales(scales) if double_quant else scales
    return NF4Tensor(packed=packed, scales=stored, shape=tuple(x.shape), dtype=x.dtype)


def unpack(t: NF4Tensor) -> jax.Array:
    """The 4-bit code indices, [n_blocks, 64] uint8 (padding included)."""
    return jnp.stack([t.packed >> 4, t.packed & 0xF], axis=-1).reshape(-1, BLOCK)


def dequantize(t: NF4Tensor, dtype=None) -> jax.Array:
    """The float array of `t.shape` in `dtype` (default: the original dtype)."""
    idx = unpack(t)  # [n_blocks, 64]
    scales = _dequantize_scales(t.scales, idx.shape[0])
    values = _code()[idx] * scales[:, None]  # float32 [n_blocks, 64]
    return values.reshape(-1)[: t.size].reshape(t.shape).astype(dtype or t.dtype)


def quantize_params(params, is_target: Callable[[tuple, Any], bool], double_quant: bool = False):
    """Replaces the leaves where `is_target(path, leaf)` by `NF4Tensor`s.

    Args:
      params: a nested dict of arrays (unboxed, e.g. `nn.unbox(variables['params'])`).
      is_target: `(path: tuple of str keys, leaf) -> bool`.
    Returns:
      the same nested dict with the chosen leaves quantised.
    """
    flat = traverse_util.flatten_dict(meta.unbox(params))
    return traverse_util.unflatten_dict(
        {path: quantize(leaf, double_quant) if is_target(path, leaf) else leaf for path, leaf in flat.items()}
    )


def dequantize_params(params):
    """Every `NF4Tensor` in a nested dict replaced by its float array (original dtype)."""
    return jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, NF4Tensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, NF4Tensor),
    )
