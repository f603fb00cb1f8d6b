"""Parameter counts, training FLOPs per token and the peak FLOP/s that MFU divides by.

`param_counts` is tested equal to the parameters `Transformer.init` and `NNLM.init` create; every
FLOPs and MFU figure in the project comes from `flops_per_token` and `peak_flops_per_device`.
"""

import statistics
import time

import jax
import jax.numpy as jnp

from lm.model import DTYPES, ModelConfig

# Dense bfloat16 peak FLOP/s by device kind (vendor data sheets); other devices are measured.
PEAK_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
}


def _layer_params(c: ModelConfig) -> int:
    """Parameters of one block: attention, MLP and its two norms."""
    q_width, kv_width = c.num_heads * c.head_size, c.kv_heads * c.head_size
    attn = c.d_model * (q_width + 2 * kv_width) + q_width * c.d_model
    mlp_in = 2 if c.mlp == "swiglu" else 1
    mlp = (mlp_in + 1) * c.d_model * c.d_ff
    if c.use_bias or c.qkv_bias:
        attn += q_width + 2 * kv_width
    if c.use_bias:
        attn += c.d_model
        mlp += mlp_in * c.d_ff + c.d_model
    return attn + mlp + 2 * _norm_params(c)


def _norm_params(c: ModelConfig) -> int:
    """A norm's scale, plus the bias of a LayerNorm with use_bias."""
    return c.d_model * (2 if c.norm == "layernorm" and c.use_bias else 1)


def _nnlm_params(c: ModelConfig) -> dict:
    """An NNLM's parameters by part: 'lookup' (the token table and the no-token vector), 'hidden'
    (H and d), 'out' (U and b) and 'direct' (W, or 0)."""
    context = c.nnlm_context * c.d_model
    return {
        "lookup": (c.vocab_size + 1) * c.d_model,
        "hidden": (context + 1) * c.nnlm_hidden,
        "out": (c.nnlm_hidden + 1) * c.vocab_size,
        "direct": context * c.vocab_size if c.nnlm_direct else 0,
    }


def param_counts(config: ModelConfig) -> dict:
    """Parameter counts by kind.

    Returns:
      {'total', 'non_embedding', 'embedding', 'position_embedding'} ints, where total is their
      sum. For a Transformer, 'embedding' holds the vocabulary matrices: the token table, plus the
      output head when it is untied; 'non_embedding' (Kaplan et al. 2020's N) is the blocks and the
      final norm. For an NNLM, 'embedding' is what is looked up (the token table and the no-token
      vector) and 'non_embedding' everything that is multiplied (hidden, output and direct layers).
    """
    c = config
    if c.kind == "nnlm":
        parts = _nnlm_params(c)
        non_embedding = parts["hidden"] + parts["out"] + parts["direct"]
        return {
            "total": parts["lookup"] + non_embedding,
            "non_embedding": non_embedding,
            "embedding": parts["lookup"],
            "position_embedding": 0,
        }
    embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    position = c.max_seq_len * c.d_model if c.positions == "learned" else 0
    non_embedding = c.num_layers * _layer_params(c) + _norm_params(c)
    return {
        "total": embedding + position + non_embedding,
        "non_embedding": non_embedding,
        "embedding": embedding,
        "position_embedding": position,
    }


def _chinchilla_forward(c: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs of one sequence, Hoffmann et al. 2022 Appendix F, extended to GQA/SwiGLU.

    embeddings 2·T·V·D; per layer: QKV 2·T·D·Q·(H + 2·H_kv) (paper: 2·3·T·D·Q·H),
    logits 2·T²·Q·H, softmax 3·H·T², reduction 2·T²·Q·H, projection 2·T·Q·H·D,
    dense 2·T·D·F·(2, or 3 for SwiGLU); final logits 2·T·D·V.
    """
    t, d, v, q, h = seq_len, c.d_model, c.vocab_size, c.head_size, c.num_heads
    attention = (
        2 * t * d * q * (h + 2 * c.kv_heads)
        + 2 * t * t * q * h
        + 3 * h * t * t
        + 2 * t * t * q * h
        + 2 * t * q * h * d
    )
    dense = 2 * t * d * c.d_ff * (3 if c.mlp == "swiglu" else 2)
    return 2 * t * v * d + c.num_layers * (attention + dense) + 2 * t * d * v


def _nnlm_forward(c: ModelConfig) -> float:
    """Forward FLOPs of one NNLM token, as Chinchilla counts them: the embedding 2·V·m (once per
    token: its context reuses the looked-up rows), hidden 2·c·m·h, output 2·h·V, direct 2·c·m·V."""
    context = c.nnlm_context * c.d_model
    direct = 2 * context * c.vocab_size if c.nnlm_direct else 0
    return (
        2 * c.vocab_size * c.d_model + 2 * context * c.nnlm_hidden + 2 * c.nnlm_hidden * c.vocab_size + direct
    )


def flops_per_token(config: ModelConfig, seq_len: int, method: str = "palm") -> float:
    """Training (forward + backward) FLOPs per token.

    An NNLM has no attention and its cost does not depend on seq_len: 'palm' is 6 × its multiplied
    (non-embedding) parameters, as PaLM leaves out the looked-up position table; 'chinchilla' is
    3 × `_nnlm_forward`; '6nd' and '6n' as below.

    Methods:
      'palm': 6·N + 12·L·H·Q·T (PaLM, Chowdhery et al. 2022, Appendix B; nanoGPT's
        estimate_mfu), N = all parameters except position embeddings, L layers, H heads,
        Q head_dim, T = seq_len; causal attention is not halved.
      'chinchilla': 3 × the forward FLOPs of Hoffmann et al. 2022, Appendix F (embeddings,
        attention QKV/logits/softmax/reduction/projection, dense, final logits), per token.
      '6nd': 6 × all parameters (Chinchilla's C ≈ 6ND with N the total parameter count).
      '6n': 6 × non-embedding parameters (Kaplan et al. 2020, C ≈ 6N).
    """
    counts = param_counts(config)
    if config.kind == "nnlm" and method in ("palm", "chinchilla"):
        return 6.0 * counts["non_embedding"] if method == "palm" else 3.0 * _nnlm_forward(config)
    if method == "palm":
        n = counts["total"] - counts["position_embedding"]
        return 6.0 * n + 12.0 * config.num_layers * config.num_heads * config.head_size * seq_len
    if method == "chinchilla":
        return 3.0 * _chinchilla_forward(config, seq_len) / seq_len
    if method == "6nd":
        return 6.0 * counts["total"]
    if method == "6n":
        return 6.0 * counts["non_embedding"]
    raise ValueError(f"unknown FLOPs method {method!r}: expected one of {FLOPS_METHODS}")


FLOPS_METHODS = ("palm", "chinchilla", "6nd", "6n")


def steps_for_budget(
    config: ModelConfig, seq_len: int, tokens_per_step: int, budget: float, method: str
) -> int:
    """Training steps that spend `budget` FLOPs (IsoFLOP sweeps): round(C / (FLOPs/token × tokens/step)).

    At least one step; the tokens actually trained are `steps × tokens_per_step`, so the realised
    compute differs from the budget by under half a step.
    """
    per_step = flops_per_token(config, seq_len, method) * tokens_per_step
    return max(1, round(budget / per_step))


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of one jitted [n, n] @ [n, n] matmul on the first device: median of `repeats`."""
    a = jax.device_put(jnp.ones((n, n), DTYPES[dtype]), jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds)


def peak_flops_per_device(configured: float, dtype: str) -> tuple:
    """The FLOP/s that MFU divides by, and where it came from.

    Args:
      configured: `config.train.peak_flops`; > 0 wins.
      dtype: compute dtype name; the data-sheet table holds bfloat16 peaks only.
    Returns:
      (FLOP/s per device, 'config' | 'data sheet: <kind>' | 'measured matmul').
    """
    if configured > 0:
        return float(configured), "config"
    kind = jax.devices()[0].device_kind
    if dtype == "bfloat16" and kind in PEAK_BF16:
        return PEAK_BF16[kind], f"data sheet: {kind}"
    return measure_matmul_flops(dtype), "measured matmul"
