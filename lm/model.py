"""Language models from one frozen config: a decoder-only Transformer (GPT-2 and Llama styles),
or Bengio et al.'s neural probabilistic language model (`NNLM`); `build_model` picks by `kind`.

GPT-2: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings.
Llama: rotary positions, RMSNorm, SwiGLU, no biases, untied head, grouped-query attention.
Blocks are pre-norm with a final norm. Every parameter carries logical axis names
(`lm.sharding`); activations are constrained to (BATCH, LENGTH, ACT_EMBED) at block boundaries.

Speed on XLA:CPU: dense layers run on rank-2 activations `[batch*seq, width]` (rank-3 dense is
about 2x slower forward+backward there); kernels keep their multi-axis logical shapes and are
reshaped at use. Attention is two einsums with a `where` mask (`lm.attention`).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import attention
from lm.errors import ConfigError
from lm.sharding import ACT_EMBED, BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LENGTH, MLP, POSITIONS, VOCAB

KINDS = ("transformer", "nnlm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}
# Keys that the runner fills from `config.precision`, named as the user wrote them.
_KEY_NAMES = {"dtype": "config.precision.compute_dtype", "param_dtype": "config.precision.param_dtype"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model hyperparameters; the field names are the keys of `config.model`."""

    vocab_size: int
    num_layers: int
    num_heads: int
    d_model: int
    d_ff: int
    max_seq_len: int
    num_kv_heads: int = 0  # 0 -> num_heads (multi-head); fewer -> grouped-query attention
    head_dim: int = 0  # 0 -> d_model // num_heads
    positions: str = "learned"  # learned | rotary
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu
    tie_embeddings: bool = True
    use_bias: bool = True  # dense and LayerNorm biases
    dropout: float = 0.0
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | llama3 (Llama 3's frequency-dependent rotary scaling)
    rope_factor: float = 8.0  # llama3: how much longer the context is than rope_original_max_len
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths over original/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths under original/high are kept
    rope_original_max_len: int = 8192  # llama3: the context length the frequencies were trained at
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2)
    norm_eps: float = 1e-5
    remat: str = "none"  # none | full | dots: jax.checkpoint policy per block
    attention: str = "xla"  # xla (any backend) | cudnn (fused flash attention, NVIDIA GPUs)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    kind: str = "transformer"  # transformer | nnlm (Bengio et al. 2003; d_model is its embedding size)
    nnlm_context: int = 5  # nnlm: n - 1, the tokens (the input token and those before it) seen
    nnlm_hidden: int = 256  # nnlm: tanh hidden units
    nnlm_direct: bool = False  # nnlm: direct connections from the embeddings to the logits
    bidirectional: bool = False  # every token attends to its whole segment (an encoder: BERT)
    type_vocab_size: int = 0  # > 0: BERT's token-type (segment A/B) embeddings, 'type_embed'
    # Parameter-efficient tuning, set by the run (lm.prompt_tuning), not by config.model: learned
    # key/value prefixes at every layer (Li and Liang 2021) and soft prompt embeddings (Lester et al.
    # 2021), both visible to every query.
    prefix_length: int = 0
    prompt_length: int = 0

    def __post_init__(self):
        self._require(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}")
        if self.kind == "nnlm":
            self._require(self.nnlm_context > 0, "nnlm_context", "must be positive")
            self._require(self.nnlm_hidden > 0, "nnlm_hidden", "must be positive")
        for key in ("vocab_size", "num_layers", "num_heads", "d_model", "d_ff", "max_seq_len"):
            self._require(getattr(self, key) > 0, key, "must be positive")
        self._require(self.num_kv_heads >= 0, "num_kv_heads", "must be >= 0")
        self._require(self.prefix_length >= 0, "prefix_length", "must be >= 0")
        self._require(self.type_vocab_size >= 0, "type_vocab_size", "must be >= 0")
        self._require(self.prompt_length >= 0, "prompt_length", "must be >= 0")
        self._require(
            self.num_heads % self.kv_heads == 0, "num_kv_heads", f"must divide num_heads={self.num_heads}"
        )
        self._require(self.head_dim >= 0, "head_dim", "must be >= 0")
        if self.head_dim == 0:
            self._require(
                self.d_model % self.num_heads == 0,
                "num_heads",
                f"must divide d_model={self.d_model} (or set head_dim)",
            )
        for key, allowed in (
            ("positions", ("learned", "rotary")),
            ("rope_scaling", ("none", "llama3")),
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu")),
            ("remat", ("none", "full", "dots")),
            ("attention", ("xla", "cudnn")),
            ("dtype", tuple(DTYPES)),
            ("param_dtype", tuple(DTYPES)),
        ):
            self._require(getattr(self, key) in allowed, key, f"must be one of {', '.join(allowed)}")
        if self.positions == "rotary":
            self._require(
                self.head_size % 2 == 0,
                "head_dim",
                f"must be even for rotary positions (is {self.head_size})",
            )
        self._require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self._require(self.rope_theta > 0, "rope_theta", "must be positive")
        if self.rope_scaling == "llama3":
            for key in ("rope_factor", "rope_low_freq_factor", "rope_original_max_len"):
                self._require(getattr(self, key) > 0, key, "must be positive")
            self._require(
                self.rope_high_freq_factor > self.rope_low_freq_factor,
                "rope_high_freq_factor",
                f"must exceed rope_low_freq_factor={self.rope_low_freq_factor}",
            )
        self._require(self.norm_eps > 0, "norm_eps", "must be positive")

    def _require(self, ok: bool, key: str, why: str):
        if not ok:
            name = _KEY_NAMES.get(key, f"config.model.{key}")
            raise ConfigError(f"{name}={getattr(self, key)!r} {why}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def rope_scaling_params(self) -> dict | None:
        """The llama3 rotary scaling as `attention.rotary`'s `scaling` argument, or None."""
        if self.rope_scaling == "none":
            return None
        return {
            "factor": self.rope_factor,
            "low_freq_factor": self.rope_low_freq_factor,
            "high_freq_factor": self.rope_high_freq_factor,
            "original_max_len": self.rope_original_max_len,
        }

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def residual_std(self) -> float:
        """GPT-2's init for projections that write into the residual stream."""
        return 0.02 / math.sqrt(2 * self.num_layers)


def _init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _embedding(cfg: ModelConfig, rows: int, row_axis, name: str) -> nn.Embed:
    """A [rows, d_model] table of the Transformer (token, position or token-type embeddings)."""
    return nn.Embed(
        rows,
        cfg.d_model,
        embedding_init=_init(0.02, (row_axis, EMBED)),
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        name=name,
    )


def _constant(init, axes: tuple):
    return nn.with_logical_partitioning(init, axes)


class Linear(nn.Module):
    """A dense layer on rank-2 activations whose kernel keeps its multi-axis logical shape.

    The kernel is `in_shape + out_shape` with logical names `axes`; it is reshaped to a matrix at
    use. The bias (if any: `bias`, or config.use_bias when None) has shape `out_shape`.
    """

    in_shape: tuple
    out_shape: tuple
    axes: tuple
    config: ModelConfig
    std: float = 0.02
    bias: bool | None = None
    out_dtype: object = None  # None: the compute dtype; jnp.float32 for logits

    @nn.compact
    def __call__(self, x):
        """x: [tokens, prod(in_shape)] -> [tokens, prod(out_shape)] in the compute dtype (or out_dtype)."""
        cfg = self.config
        kernel = self.param(
            "kernel", _init(self.std, self.axes), self.in_shape + self.out_shape, cfg.params_dtype
        )
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = jnp.dot(
            x.astype(cfg.compute_dtype),
            kernel.reshape(n_in, n_out).astype(cfg.compute_dtype),
            preferred_element_type=self.out_dtype,
        )
        if cfg.use_bias if self.bias is None else self.bias:
            bias_axes = self.axes[len(self.in_shape) :]
            bias = self.param(
                "bias", _constant(nn.initializers.zeros, bias_axes), self.out_shape, cfg.params_dtype
            )
            y = y + bias.reshape(n_out).astype(y.dtype)
        return y


def norm_layer(cfg: ModelConfig, name: str) -> nn.Module:
    """LayerNorm (bias when use_bias) or RMSNorm over the last axis; statistics in float32."""
    common = dict(
        epsilon=cfg.norm_eps,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        scale_init=_constant(nn.initializers.ones, (EMBED,)),
        name=name,
    )
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(use_bias=cfg.use_bias, bias_init=_constant(nn.initializers.zeros, (EMBED,)), **common)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with optional rotary positions and KV cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, positions, layer_cache=None, cache_index=None, extra_kv=None):
        """Attends within the sequence, or over the cache after writing this step into it.

        Args:
          x: [batch, seq, d_model].
          mask: [batch, seq, extra + keys] bool; keys = seq, or the cache length with a cache;
            the first `extra` columns are extra_kv's.
          positions: [batch, seq] int32, used by rotary positions.
          layer_cache: None or {'key', 'value': [batch, kv_heads, cache_len, head_dim]}.
          cache_index: [] int32 slot where this step's keys are written.
          extra_kv: None or (key, value) [batch, kv_heads, extra, head_dim]: keys and values put
            before the sequence's own (a learned prefix, a soft prompt's).
        Returns:
          ([batch, seq, d_model], the updated layer cache or None, this call's own (key, value)
          [batch, kv_heads, seq, head_dim]).
        """
        cfg = self.config
        b, n, d = x.shape
        h, kvh, hd = cfg.num_heads, cfg.kv_heads, cfg.head_size
        x = x.reshape(b * n, d)  # [tokens, d_model]
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        q = Linear((d,), (h, hd), (EMBED, HEADS, HEAD_DIM), cfg, bias=qkv_bias, name="query")(x)
        k = Linear((d,), (kvh, hd), (EMBED, KV_HEADS, HEAD_DIM), cfg, bias=qkv_bias, name="key")(x)
        v = Linear((d,), (kvh, hd), (EMBED, KV_HEADS, HEAD_DIM), cfg, bias=qkv_bias, name="value")(x)
        q = q.reshape(b, n, h, hd) * jnp.asarray(hd**-0.5, cfg.compute_dtype)
        k, v = k.reshape(b, n, kvh, hd), v.reshape(b, n, kvh, hd)  # [batch, seq, kv_heads, hd]
        if cfg.positions == "rotary":
            q = attention.rotary(q, positions, cfg.rope_theta, cfg.rope_scaling_params)
            k = attention.rotary(k, positions, cfg.rope_theta, cfg.rope_scaling_params)
        causal_only = extra_kv is None and not cfg.bidirectional
        if layer_cache is None and cfg.attention == "cudnn" and causal_only:
            own = (attention.heads_first(k), attention.heads_first(v))
            return self._project_out(attention.fused_attention(q, k, v, mask), b, n), None, own
        k, v = attention.heads_first(k), attention.heads_first(v)  # [batch, kv_heads, seq, hd]
        own, new_cache = (k, v), None
        if layer_cache is not None:
            k = attention.write_cache(layer_cache["key"], k, cache_index, axis=2)  # [b, kvh, cache, hd]
            v = attention.write_cache(layer_cache["value"], v, cache_index, axis=2)
            new_cache = {"key": k, "value": v}
        if extra_kv is not None:
            k = jnp.concatenate([extra_kv[0].astype(k.dtype), k], axis=2)  # [b, kvh, extra + keys, hd]
            v = jnp.concatenate([extra_kv[1].astype(v.dtype), v], axis=2)
        if layer_cache is None and causal_only:
            out = attention.causal_attention(q, k, v, mask)  # [batch, seq, heads, hd]
        else:
            out = attention.dot_product_attention(q, k, v, mask)
        return self._project_out(out, b, n), new_cache, own

    def _project_out(self, out, b: int, n: int):
        """[batch, seq, heads, head_dim] -> [batch, seq, d_model] through the 'out' projection."""
        cfg = self.config
        h, hd, d = cfg.num_heads, cfg.head_size, cfg.d_model
        out = Linear((h, hd), (d,), (HEADS, HEAD_DIM, EMBED), cfg, std=cfg.residual_std, name="out")(
            out.reshape(b * n, h * hd)
        )
        return out.reshape(b, n, d)


class Mlp(nn.Module):
    """GELU (tanh, GPT-2) or SwiGLU (Llama) feed-forward on [tokens, d_model]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        """x: [tokens, d_model] -> [tokens, d_model]."""
        cfg = self.config
        d, f = cfg.d_model, cfg.d_ff
        if cfg.mlp == "swiglu":
            gate = Linear((d,), (f,), (EMBED, MLP), cfg, name="wi_gate")(x)
            up = Linear((d,), (f,), (EMBED, MLP), cfg, name="wi_up")(x)
            hidden = nn.silu(gate) * up  # [tokens, d_ff]
        else:
            hidden = nn.gelu(Linear((d,), (f,), (EMBED, MLP), cfg, name="wi")(x), approximate=True)
        return Linear((f,), (d,), (MLP, EMBED), cfg, std=cfg.residual_std, name="wo")(hidden)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, mask, positions, layer_cache, cache_index, deterministic, extra_kv=None):
        """x: [batch, seq, d_model] -> ([batch, seq, d_model], updated layer cache or None, the
        attention's own (key, value) [batch, kv_heads, seq, head_dim]); `Attention` for the rest."""
        cfg = self.config
        b, n, d = x.shape
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        dropout = nn.Dropout(cfg.dropout, deterministic=deterministic)
        h, new_cache, own = Attention(cfg, name="attn")(
            norm_layer(cfg, "ln_attn")(x), mask, positions, layer_cache, cache_index, extra_kv
        )
        x = x + dropout(h)
        h = Mlp(cfg, name="mlp")(norm_layer(cfg, "ln_mlp")(x).reshape(b * n, d))
        x = x + dropout(h.reshape(b, n, d))
        return nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED)), new_cache, own


class LMHead(nn.Module):
    """The untied output projection; holds `kernel` [d_model, vocab]."""

    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        return self.param(
            "kernel", _init(0.02, (EMBED, VOCAB)), (cfg.d_model, cfg.vocab_size), cfg.params_dtype
        )


class Transformer(nn.Module):
    """Decoder-only language model: tokens -> next-token logits.

    One forward pass (`_forward`, the module's only `nn.compact` method) behind named methods,
    each with one return shape; call a method other than `__call__` with
    `model.apply(variables, ..., method=Transformer.hidden)` (or `method='hidden'`):
      __call__           logits [batch, seq, vocab]
      last_logits        logits of the last column [batch, vocab]
      hidden             final-normed hidden states [batch, seq, d_model]
      logits_and_hidden  both of the above
      extend / prefill   with a KV cache: (logits [batch, seq, vocab] / [batch, vocab], new cache)
    Every method makes the same parameters, except that `hidden` never uses the output
    projection, so an untied model's `lm_head` is made only by the others.

    Common args:
      tokens: [batch, seq] int32.
      positions: [batch, seq] int32 position of each token (default: 0.. from the cache index).
      segment_ids: [batch, seq] int32 document of each token; 0 = padding (default: all 1).
        Tokens attend only to earlier tokens of their own segment.
      deterministic: False applies dropout (needs the 'dropout' rng).
      cache: a pytree from `init_cache`; this call's tokens fill the slots from its index, and
        attend to every earlier filled slot of their segment.
    """

    config: ModelConfig

    def __call__(self, tokens, *, positions=None, segment_ids=None, deterministic=True):
        """Next-token logits: tokens [batch, seq] -> [batch, seq, vocab] float32."""
        _, logits, _ = self._forward(tokens, positions, segment_ids, deterministic, None, "all")
        return logits

    def last_logits(self, tokens, *, positions=None, segment_ids=None, deterministic=True):
        """Logits of the last column only: tokens [batch, seq] -> [batch, vocab] float32.

        The vocabulary projection of every other position is skipped (a quarter of a tiny
        model's work over a prompt).
        """
        _, logits, _ = self._forward(tokens, positions, segment_ids, deterministic, None, "last")
        return logits

    def hidden(self, tokens, *, positions=None, segment_ids=None, deterministic=True, token_types=None):
        """Final-normed hidden states: tokens [batch, seq] -> [batch, seq, d_model] in the compute
        dtype. No output projection: an untied model makes no `lm_head` parameter here.
        token_types: [batch, seq] int32 (< type_vocab_size; default 0), with type_vocab_size > 0."""
        hidden, _, _ = self._forward(tokens, positions, segment_ids, deterministic, None, None, token_types)
        return hidden

    def logits_and_hidden(self, tokens, *, positions=None, segment_ids=None, deterministic=True):
        """tokens [batch, seq] -> (logits [batch, seq, vocab] float32, final-normed hidden states
        [batch, seq, d_model] in the compute dtype), from one forward pass."""
        hidden, logits, _ = self._forward(tokens, positions, segment_ids, deterministic, None, "all")
        return logits, hidden

    def extend(self, tokens, cache, *, positions=None, segment_ids=None):
        """Writes this call's keys and values into the KV cache and attends over it (no dropout).

        Args:
          tokens: [batch, seq] int32, written to cache slots index .. index + seq - 1.
          cache: from `init_cache` or an earlier `extend` / `prefill`.
        Returns:
          (logits [batch, seq, vocab] float32, the new cache, its index advanced by seq).
        """
        _, logits, new_cache = self._forward(tokens, positions, segment_ids, True, cache, "all")
        return logits, new_cache

    def prefill(self, tokens, cache, *, positions=None, segment_ids=None):
        """As `extend`, with the logits of the last column only (a sampler's prompt pass).

        Returns:
          (logits [batch, vocab] float32, the new cache, its index advanced by seq).
        """
        _, logits, new_cache = self._forward(tokens, positions, segment_ids, True, cache, "last")
        return logits, new_cache

    @nn.compact
    def _forward(self, tokens, positions, segment_ids, deterministic, cache, head, token_types=None):
        """The forward pass that every public method runs.

        Args:
          tokens, positions, segment_ids, deterministic, cache: as in the class docstring (cache
            may be None).
          head: 'all' (logits at every column), 'last' (the last column's only), or None (no
            output projection).
        Returns:
          (hidden [batch, seq, d_model] final-normed in the compute dtype, logits float32
          ([batch, seq, vocab] for 'all', [batch, vocab] for 'last', None for None), the new cache
          or None without one).
        """
        cfg = self.config
        if cfg.kind != "transformer":
            raise ValueError(f"Transformer got a config of kind {cfg.kind!r}: build it with build_model")
        b, n = tokens.shape
        start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        slots = start + jnp.arange(n, dtype=jnp.int32)  # [seq]
        if positions is None:
            positions = jnp.broadcast_to(slots, (b, n))
        if segment_ids is None:
            segment_ids = jnp.ones((b, n), jnp.int32)
        positions = positions + cfg.prompt_length  # a soft prompt takes the first positions
        embed = _embedding(cfg, cfg.vocab_size, VOCAB, "token_embed")
        pos_table = None
        if cfg.positions == "learned":
            pos_table = _embedding(cfg, cfg.max_seq_len, POSITIONS, "pos_embed")

        def pos_embed(x, p):  # x [..., seq, d_model] + learned positions p [..., seq]
            return x if pos_table is None else x + pos_table(p)

        x = pos_embed(embed(tokens), positions)  # [batch, seq, d_model]
        if cfg.type_vocab_size:
            types = jnp.zeros((b, n), jnp.int32) if token_types is None else token_types
            x = x + _embedding(cfg, cfg.type_vocab_size, None, "type_embed")(types)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)

        if cache is None:
            key_segments, key_slots = segment_ids, slots
        else:
            key_segments = attention.write_cache(cache["segment_ids"], segment_ids, start)
            key_slots = jnp.arange(key_segments.shape[1], dtype=jnp.int32)
        if cfg.bidirectional:
            mask = attention.segment_mask(segment_ids, key_segments)
        else:
            mask = attention.causal_segment_mask(
                segment_ids, key_segments, jnp.broadcast_to(slots, (b, n)), key_slots
            )
        extra = cfg.prompt_length + cfg.prefix_length
        if extra:  # every query sees the prompt's and the prefix's keys
            mask = jnp.concatenate([jnp.ones((b, n, extra), bool), mask], axis=2)
        prompt, prefix = self._prompt_and_prefix(pos_embed, deterministic)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(6,))
        new_layers = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache["layers"][i]
            layer = block(cfg, name=f"layers_{i}")
            extra_kv = []
            if prompt is not None:  # the soft prompt through this layer: its keys and values
                prompt, _, prompt_kv = layer(
                    prompt, *self._prompt_mask_positions(), None, start, deterministic
                )
                extra_kv.append(prompt_kv)
            if prefix is not None:
                extra_kv.append((prefix[0][i][None], prefix[1][i][None]))
            extra_kv = (
                tuple(
                    jnp.concatenate(
                        [jnp.broadcast_to(kv[j], (b,) + kv[j].shape[1:]) for kv in extra_kv], axis=2
                    )
                    for j in (0, 1)
                )
                if extra_kv
                else None
            )
            x, new_layer, _ = layer(x, mask, positions, layer_cache, start, deterministic, extra_kv)
            new_layers.append(new_layer)
        hidden = norm_layer(cfg, "ln_final")(x)  # [batch, seq, d_model]
        new_cache = (
            None
            if cache is None
            else {"index": start + n, "segment_ids": key_segments, "layers": tuple(new_layers)}
        )
        if head is None:
            return hidden, None, new_cache
        if head not in ("all", "last"):
            raise ValueError(f"head={head!r} must be 'all', 'last' or None")
        x = hidden[:, -1] if head == "last" else hidden.reshape(b * n, cfg.d_model)  # [tokens, d_model]
        if cfg.tie_embeddings:
            w = embed.embedding.T  # [d_model, vocab]
        else:
            w = LMHead(cfg, name="lm_head")()
        logits = jnp.dot(x, w.astype(cfg.compute_dtype), preferred_element_type=jnp.float32)
        if head == "all":
            logits = logits.reshape(b, n, cfg.vocab_size)  # [batch, seq, vocab]
        return hidden, logits, new_cache  # 'last': [batch, vocab]

    def _prompt_mask_positions(self):
        """The soft prompt's causal mask [1, P, P] and positions [1, P] (it comes first)."""
        p = self.config.prompt_length
        return jnp.tril(jnp.ones((1, p, p), bool)), jnp.arange(p, dtype=jnp.int32)[None]

    def _prompt_and_prefix(self, pos_embed, deterministic):
        """(the soft prompt's input [1, prompt_length, d_model] or None, the prefix (key, value)
        [num_layers, kv_heads, prefix_length, head_dim] or None): parameters 'prompt' [P, d_model]
        and 'prefix_key', 'prefix_value', where the config asks for them."""
        cfg = self.config
        prompt = prefix = None
        if cfg.prompt_length:
            table = self.param(
                "prompt", _init(0.02, (None, EMBED)), (cfg.prompt_length, cfg.d_model), cfg.params_dtype
            )
            prompt = pos_embed(table.astype(cfg.compute_dtype)[None], self._prompt_mask_positions()[1])
            prompt = nn.Dropout(cfg.dropout, deterministic=deterministic)(prompt)
        if cfg.prefix_length:
            shape = (cfg.num_layers, cfg.kv_heads, cfg.prefix_length, cfg.head_size)
            axes = (None, KV_HEADS, None, HEAD_DIM)
            prefix = tuple(
                self.param(name, _init(0.02, axes), shape, cfg.params_dtype).astype(cfg.compute_dtype)
                for name in ("prefix_key", "prefix_value")
            )
        return prompt, prefix


# The NNLM's embeddings start N(0, 0.1^2): large enough that the tanh layer sees its inputs from the
# first step, small enough that a rare token's row adds little noise before it is trained.
NNLM_EMBED_STD = 0.1


class NNLM(nn.Module):
    """Bengio et al. 2003's neural probabilistic language model: tokens -> next-token logits.

    With c = nnlm_context and m = d_model: at each column t, the embeddings of tokens[t - c + 1 ..
    t] (the input token and the c - 1 before it) are concatenated, most recent first, into
    x [c * m]; then h = tanh(d + H x) [nnlm_hidden] and logits = b + U h (+ W x with nnlm_direct).
    Context slot k (k tokens back) holds a token only when that token is in the same segment:
    positions[t] >= k and segment_ids[t - k] == segment_ids[t]. Every other slot (before the
    document's first token, in a previous document, before the row's first column or the cache's
    oldest token) holds one learned "no token" vector, `empty_embed` (the same for every slot; H
    sees which slot it is in).

    Parameters (logical axes): token_embed.embedding [vocab, m] (VOCAB, EMBED), the paper's C;
    empty_embed.embedding [1, m] (None, EMBED); hidden.kernel [c, m, nnlm_hidden] (None, EMBED,
    MLP) and hidden.bias [nnlm_hidden], H and d; out.kernel [nnlm_hidden, vocab] (EMBED, VOCAB)
    and out.bias [vocab], U and b; with nnlm_direct, direct.kernel [c, m, vocab] (None, EMBED,
    VOCAB), W. Embeddings start N(0, NNLM_EMBED_STD^2) and every kernel LeCun normal (std
    1/sqrt(fan-in)). Dropout (config.dropout) applies to h.
    Transformer-only fields are unused.

    The methods are Transformer's that a plain language model needs, with its arguments:
      __call__       logits [batch, seq, vocab]
      last_logits    logits of the last column [batch, vocab]
      extend / prefill  with a cache from `init_cache` (its write index, and the last c - 1
        tokens and their segment ids): (logits [batch, seq, vocab] / [batch, vocab], new cache)
    It has no `hidden` (so no reward or value model is built on it).
    """

    config: ModelConfig

    def __call__(self, tokens, *, positions=None, segment_ids=None, deterministic=True):
        """Next-token logits: tokens [batch, seq] -> [batch, seq, vocab] float32."""
        logits, _ = self._forward(tokens, positions, segment_ids, deterministic, None, "all")
        return logits

    def last_logits(self, tokens, *, positions=None, segment_ids=None, deterministic=True):
        """Logits of the last column only: tokens [batch, seq] -> [batch, vocab] float32."""
        logits, _ = self._forward(tokens, positions, segment_ids, deterministic, None, "last")
        return logits

    def extend(self, tokens, cache, *, positions=None, segment_ids=None):
        """Logits of tokens [batch, seq] whose context continues the cache's tokens (no dropout).

        Returns:
          (logits [batch, seq, vocab] float32, the new cache: index advanced by seq, holding the
          last c - 1 tokens of cache + tokens).
        """
        return self._forward(tokens, positions, segment_ids, True, cache, "all")

    def prefill(self, tokens, cache, *, positions=None, segment_ids=None):
        """As `extend`, with the logits of the last column only: (logits [batch, vocab], new cache)."""
        return self._forward(tokens, positions, segment_ids, True, cache, "last")

    @nn.compact
    def _forward(self, tokens, positions, segment_ids, deterministic, cache, head):
        """The forward pass of every public method.

        Args:
          tokens: [batch, seq] int32; positions, segment_ids: [batch, seq] int32 or None (the
            cache's index onward; all 1).
          cache: None, or {'index': [] int32, 'tokens', 'segment_ids': [batch, c - 1] int32}, the
            tokens before this call's first (segment 0: none).
          head: 'all' (logits at every column) or 'last' (the last column's only).
        Returns:
          (logits float32 [batch, seq, vocab] or [batch, vocab], the new cache or None).
        """
        cfg = self.config
        b, n = tokens.shape
        c, m = cfg.nnlm_context, cfg.d_model
        start = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (b, n))
        if segment_ids is None:
            segment_ids = jnp.ones((b, n), jnp.int32)
        if cache is None:
            before = jnp.zeros((b, c - 1), jnp.int32)
            before_segments = before
        else:
            before, before_segments = cache["tokens"], cache["segment_ids"]
        all_tokens = jnp.concatenate([before, tokens.astype(jnp.int32)], axis=1)  # [batch, c - 1 + seq]
        all_segments = jnp.concatenate([before_segments, segment_ids.astype(jnp.int32)], axis=1)
        new_cache = None
        if cache is not None:  # the last c - 1 tokens, for the next call
            new_cache = {
                "index": start + n,
                "tokens": all_tokens[:, n:],
                "segment_ids": all_segments[:, n:],
            }
        embed_args = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        table = nn.Embed(
            cfg.vocab_size,
            m,
            embedding_init=_init(NNLM_EMBED_STD, (VOCAB, EMBED)),
            name="token_embed",
            **embed_args,
        )
        empty = nn.Embed(
            1, m, embedding_init=_init(NNLM_EMBED_STD, (None, EMBED)), name="empty_embed", **embed_args
        )(jnp.zeros((1,), jnp.int32))[0]  # [m]
        if head == "last":  # the last column alone: its context is the last c columns
            all_tokens, all_segments = all_tokens[:, -c:], all_segments[:, -c:]
            positions, segment_ids, n = positions[:, -1:], segment_ids[:, -1:], 1
        elif head != "all":
            raise ValueError(f"head={head!r} must be 'all' or 'last'")
        embedded = table(all_tokens)  # [batch, c - 1 + seq, m]
        slots = []
        for k in range(c):  # slot k of column t is column t + c - 1 - k of the concatenation
            lo = c - 1 - k
            valid = (positions >= k) & (all_segments[:, lo : lo + n] == segment_ids)  # [batch, seq]
            slots.append(jnp.where(valid[..., None], embedded[:, lo : lo + n], empty))
        x = jnp.stack(slots, axis=2).reshape(b * n, c * m)  # [tokens, c * m]
        h = Linear(
            (c, m), (cfg.nnlm_hidden,), (None, EMBED, MLP), cfg, std=(c * m) ** -0.5, bias=True, name="hidden"
        )(x)
        h = nn.Dropout(cfg.dropout, deterministic=deterministic)(jnp.tanh(h))  # [tokens, nnlm_hidden]
        logits = Linear(
            (cfg.nnlm_hidden,),
            (cfg.vocab_size,),
            (EMBED, VOCAB),
            cfg,
            std=cfg.nnlm_hidden**-0.5,
            bias=True,
            out_dtype=jnp.float32,
            name="out",
        )(h)  # [tokens, vocab]
        if cfg.nnlm_direct:
            logits = logits + Linear(
                (c, m),
                (cfg.vocab_size,),
                (None, EMBED, VOCAB),
                cfg,
                std=(c * m) ** -0.5,
                bias=False,
                out_dtype=jnp.float32,
                name="direct",
            )(x)
        logits = logits.reshape(b, cfg.vocab_size) if head == "last" else logits.reshape(b, n, cfg.vocab_size)
        return logits, new_cache


def build_model(config: ModelConfig) -> nn.Module:
    """The plain language model of `config.kind`: `Transformer` or `NNLM`, called alike
    (`__call__`, `last_logits`, `extend`, `prefill`; `init_cache` makes either's cache)."""
    return NNLM(config) if config.kind == "nnlm" else Transformer(config)


def init_cache(config: ModelConfig, batch: int, max_len: int):
    """An empty cache for `build_model(config)`: write index 0 and every slot empty (segment 0).

    Returns, for a Transformer (a KV cache):
      {'index': [] int32, 'segment_ids': [batch, max_len] int32,
       'layers': tuple of {'key', 'value': [batch, kv_heads, max_len, head_dim] compute dtype}};
    for an NNLM (max_len unused): {'index': [] int32, 'tokens', 'segment_ids': [batch,
    nnlm_context - 1] int32}, the tokens before the next call's first.
    """
    if config.kind == "nnlm":
        before = jnp.zeros((batch, config.nnlm_context - 1), jnp.int32)
        return {"index": jnp.zeros((), jnp.int32), "tokens": before, "segment_ids": before}
    shape = (batch, config.kv_heads, max_len, config.head_size)
    layer = lambda: {
        "key": jnp.zeros(shape, config.compute_dtype),
        "value": jnp.zeros(shape, config.compute_dtype),
    }
    return {
        "index": jnp.zeros((), jnp.int32),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "layers": tuple(layer() for _ in range(config.num_layers)),
    }
