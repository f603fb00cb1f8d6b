"""NF4 storage (QLoRA): the code values, bytes per parameter, round-trip and double-quantisation error."""
import jax
import jax.numpy as jnp
import numpy as np

from lm import quant

# The NF4 values as listed in the QLoRA paper's appendix (arXiv:2305.14314) and in bitsandbytes.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))



# ------------------------------------------------------------------------------------------ NF4
def test_nf4_code_values_are_the_papers():
    assert quant.NF4_CODE == tuple(PAPER_NF4)
    assert len(quant.NF4_CODE) == 16 and list(quant.NF4_CODE) == sorted(quant.NF4_CODE)


def test_nf4_storage_and_round_trip():
    x = jax.random.normal(jax.random.key(0), (256, 512)) * 0.02
    t, td = quant.quantize(x), quant.quantize(x, double_quant=True)
    assert t.packed.dtype == jnp.uint8 and t.packed.shape == (x.size // 2,)
    assert t.nbytes / x.size == 0.5 + 4 / 64 <= 0.57
    assert td.nbytes / x.size < 0.52  # 0.5 + 1/64 + 4/(64*256) + the 4-byte offset
    # Each value decodes to the nearest code times its block's absmax, so the error is at most
    # half the widest gap between neighbouring codes (-1 to -0.696) times that absmax.
    blocks = np.asarray(x).reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    error = np.abs(np.asarray(quant.dequantize(t)).reshape(-1, 64) - blocks)
    half_gap = np.max(np.diff(PAPER_NF4)) / 2
    assert np.all(error <= half_gap * absmax * (1 + 1e-6))
    nearest = np.argmin(np.abs(blocks[..., None] / absmax[..., None] - np.array(PAPER_NF4)), -1)
    np.testing.assert_array_equal(np.asarray(quant.unpack(t)), nearest)
    assert rel(quant.dequantize(t), x) < 0.1  # measured 0.092 for Gaussian weights


def test_nf4_odd_sizes_zero_blocks_and_dtypes():
    x = jnp.concatenate([jnp.zeros(64), jnp.linspace(-3.0, 5.0, 47)]).reshape(3, 37)
    t = quant.quantize(x.astype(jnp.bfloat16))
    assert t.packed.shape == (64,)  # 111 values pad to two blocks
    y = jax.jit(quant.dequantize)(t)
    assert y.shape == (3, 37) and y.dtype == jnp.bfloat16
    assert quant.dequantize(t, jnp.float32).dtype == jnp.float32
    flat = np.asarray(y, np.float32).reshape(-1)
    np.testing.assert_array_equal(flat[:64], 0.0)  # an all-zero block stays zero
    assert flat[-1] == 5.0  # the absmax is code 1.0 exactly
    half_gap = np.max(np.diff(PAPER_NF4)) / 2
    assert np.all(np.abs(flat[64:] - np.linspace(-3.0, 5.0, 47)) <= half_gap * 5.0 + 0.02)


def test_double_quant_close_to_single():
    x = jax.random.normal(jax.random.key(1), (256, 512))
    t, td = quant.quantize(x), quant.quantize(x, double_quant=True)
    np.testing.assert_array_equal(np.asarray(td.packed), np.asarray(t.packed))
    # The int8 scales are off by at most half a step, absmax/254 of their 256-block; a value's
    # error is that times its code's magnitude (at most 1).
    centred = np.asarray(t.scales) - np.asarray(t.scales).mean()
    step = np.abs(centred.reshape(-1, 256)).max(axis=1) / 254
    bound = np.repeat(step, 256 * 64).reshape(x.shape) * (1 + 1e-4) + 1e-6
    diff = np.abs(np.asarray(quant.dequantize(td)) - np.asarray(quant.dequantize(t)))
    assert np.all(diff <= bound)
    assert diff.max() / np.abs(np.asarray(x)).max() < 2e-3
