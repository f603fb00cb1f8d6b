"""Model tests: parameter counts, parity with a numpy reference, masking, axis names, losses."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm import attention, flops, losses
from lm.errors import ConfigError
from lm.model import ModelConfig, Transformer
from lm.sharding import EMBED, HEAD_DIM, HEADS, KV_HEADS, MLP, POSITIONS, VOCAB

GPT2_SMALL = ModelConfig(
    vocab_size=50257, num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_seq_len=1024
)
TINY = dict(vocab_size=61, num_layers=2, num_heads=4, d_model=32, d_ff=48, max_seq_len=32)
STYLES = {
    "gpt2": ModelConfig(**TINY),
    "llama": ModelConfig(
        **TINY,
        num_kv_heads=2,
        positions="rotary",
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=False,
        use_bias=False,
        rope_theta=500.0,
        norm_eps=1e-6,
    ),
}


def real_count(config):
    shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(shapes)))


@functools.lru_cache
def random_params(config, seed=0):
    """Parameters with O(1) random values (norm scales near 1), so every term shows in logits."""
    shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = 0.3 * rng.standard_normal(leaf.shape, np.float32)
        return jnp.asarray(1.0 + noise if jax.tree_util.keystr(path).endswith("['scale']") else noise)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes))


# ---------------------------------------------------------------- numpy reference (float64)
def np_norm(x, p, c):
    if c.norm == "rmsnorm":
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + c.norm_eps) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + c.norm_eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def np_dense(x, p):
    kernel = p["kernel"]
    out = x @ kernel.reshape(x.shape[-1], -1)
    return out + p["bias"].reshape(-1) if "bias" in p else out


def np_rotary(x, pos, theta):
    half = x.shape[-1] // 2
    angle = pos[:, None] * theta ** (-np.arange(half) / half)  # [seq, half]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_forward(params, c, tokens, positions=None, segments=None):
    """Row by row, head by head: tokens [batch, seq] -> logits [batch, seq, vocab]."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    hd, kvh = c.head_size, c.kv_heads
    out = []
    for row, toks in enumerate(np.asarray(tokens)):
        seq = len(toks)
        pos = np.arange(seq) if positions is None else np.asarray(positions[row])
        seg = np.ones(seq) if segments is None else np.asarray(segments[row])
        allowed = (np.arange(seq)[None] <= np.arange(seq)[:, None]) & (seg[None] == seg[:, None])
        x = p["token_embed"]["embedding"][toks]
        if c.positions == "learned":
            x = x + p["pos_embed"]["embedding"][pos]
        for i in range(c.num_layers):
            lp = p[f"layers_{i}"]
            h = np_norm(x, lp["ln_attn"], c)
            q = np_dense(h, lp["attn"]["query"]).reshape(seq, c.num_heads, hd)
            k = np_dense(h, lp["attn"]["key"]).reshape(seq, kvh, hd)
            v = np_dense(h, lp["attn"]["value"]).reshape(seq, kvh, hd)
            if c.positions == "rotary":
                q, k = np_rotary(q, pos, c.rope_theta), np_rotary(k, pos, c.rope_theta)
            heads = []
            for j in range(c.num_heads):
                g = j // (c.num_heads // kvh)
                s = np.where(allowed, q[:, j] @ k[:, g].T / np.sqrt(hd), -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                heads.append((w / w.sum(-1, keepdims=True)) @ v[:, g])
            x = x + np_dense(np.concatenate(heads, -1), lp["attn"]["out"])
            h = np_norm(x, lp["ln_mlp"], c)
            m = lp["mlp"]
            if c.mlp == "swiglu":
                gate = np_dense(h, m["wi_gate"])
                hidden = gate / (1 + np.exp(-gate)) * np_dense(h, m["wi_up"])
            else:
                a = np_dense(h, m["wi"])
                hidden = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
            x = x + np_dense(hidden, m["wo"])
        x = np_norm(x, p["ln_final"], c)
        head = p["token_embed"]["embedding"].T if c.tie_embeddings else p["lm_head"]["kernel"]
        out.append(x @ head)
    return np.stack(out)


# ---------------------------------------------------------------- parameter counts and FLOPs
def test_gpt2_small_param_count_is_exact():
    assert real_count(GPT2_SMALL) == 124_439_808
    counts = flops.param_counts(GPT2_SMALL)
    assert counts == {
        "total": 124_439_808,
        "non_embedding": 85_056_000,
        "embedding": 38_597_376,
        "position_embedding": 786_432,
    }


@pytest.mark.parametrize(
    "config",
    [
        STYLES["llama"],
        ModelConfig(
            vocab_size=1000,
            num_layers=3,
            num_heads=8,
            num_kv_heads=2,
            head_dim=24,
            d_model=128,
            d_ff=344,
            max_seq_len=64,
            positions="rotary",
            norm="rmsnorm",
            mlp="swiglu",
            tie_embeddings=False,
            use_bias=False,
        ),
        ModelConfig(**TINY, mlp="swiglu", use_bias=True, num_kv_heads=1, tie_embeddings=False),
        ModelConfig(**TINY, norm="layernorm", use_bias=False),
        ModelConfig(**TINY, positions="rotary", norm="rmsnorm", mlp="swiglu", use_bias=False, qkv_bias=True),
    ],
    ids=["llama-tiny", "llama-gqa-headdim", "swiglu-bias-mqa", "layernorm-nobias", "qwen2-qkv-bias"],
)
def test_analytic_param_count_equals_real(config):
    assert flops.param_counts(config)["total"] == real_count(config)


def test_flops_per_token():
    # nanoGPT's estimate_mfu for GPT-2 small at T=1024: N excludes the position table.
    assert flops.flops_per_token(GPT2_SMALL, 1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    assert flops.flops_per_token(GPT2_SMALL, 1024, "6n") == 6 * 85_056_000
    # Chinchilla Appendix F by hand: V=10, D=8, T=4, 1 layer, 2 heads of 4, F=16.
    c = ModelConfig(vocab_size=10, num_layers=1, num_heads=2, d_model=8, d_ff=16, max_seq_len=4)
    forward = (
        2 * 4 * 10 * 8  # embeddings
        + 2 * 3 * 4 * 8 * 8
        + 2 * 4 * 4 * 8
        + 3 * 2 * 4 * 4
        + 2 * 4 * 4 * 8
        + 2 * 4 * 8 * 8
        + 2 * 4 * (8 * 16 + 8 * 16)  # dense block
        + 2 * 4 * 8 * 10
    )  # final logits
    assert flops.flops_per_token(c, 4, "chinchilla") == 3 * forward / 4
    with pytest.raises(ValueError):
        flops.flops_per_token(c, 4, "kaplan")


def test_peak_flops_is_configured_or_measured():
    assert flops.peak_flops_per_device(1e12, "float32") == (1e12, "config")
    assert flops.measure_matmul_flops("float32", n=128, repeats=2) > 1e8


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^config\.model\.num_heads=5 must divide d_model=384"):
        ModelConfig(vocab_size=10, num_layers=1, num_heads=5, d_model=384, d_ff=8, max_seq_len=8)
    with pytest.raises(ConfigError, match=r"config\.model\.num_kv_heads=3"):
        ModelConfig(**TINY, num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"config\.model\.norm=.batchnorm"):
        ModelConfig(**TINY, norm="batchnorm")
    with pytest.raises(ConfigError, match=r"config\.precision\.compute_dtype"):
        ModelConfig(**TINY, dtype="float8")


# ---------------------------------------------------------------- forward pass
@pytest.mark.parametrize("style", sorted(STYLES))
def test_forward_matches_numpy_reference(style):
    c = STYLES[style]
    params = random_params(c)
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 0, c.vocab_size)
    logits = jax.jit(Transformer(c).apply)(params, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 20, c.vocab_size)
    expected = np_forward(params, c, tokens)
    assert np.abs(expected).max() > 1.0  # the check is not vacuous
    np.testing.assert_allclose(logits, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_packed_documents_do_not_interact(style):
    c = STYLES[style]
    params = random_params(c)
    model = Transformer(c)
    apply = jax.jit(model.apply)
    docs = [jax.random.randint(jax.random.key(i), (n,), 1, c.vocab_size) for i, n in ((3, 5), (4, 7))]
    packed = jnp.concatenate(docs + [jnp.zeros(4, jnp.int32)])[None]  # [1, 16]
    segments = jnp.array([[1] * 5 + [2] * 7 + [0] * 4])
    positions = jnp.array([list(range(5)) + list(range(7)) + [0] * 4])
    logits = apply(params, packed, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(logits[0, :5], apply(params, docs[0][None])[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:12], apply(params, docs[1][None])[0], atol=1e-5)
    np.testing.assert_allclose(
        logits, np_forward(params, c, packed, positions, segments), rtol=2e-4, atol=2e-4
    )


@pytest.mark.parametrize("style", sorted(STYLES))
def test_causal_future_tokens_do_not_change_the_past(style):
    c = STYLES[style]
    params = random_params(c)
    model = Transformer(c)
    apply = jax.jit(model.apply)
    tokens = jax.random.randint(jax.random.key(5), (1, 24), 0, c.vocab_size)
    changed = tokens.at[0, 10].set((tokens[0, 10] + 1) % c.vocab_size)
    a, b = apply(params, tokens), apply(params, changed)
    np.testing.assert_array_equal(a[0, :10], b[0, :10])
    assert np.abs(a[0, 10:] - b[0, 10:]).min(axis=-1).max() > 1e-3


def test_long_sequence_blocked_attention_matches_reference():
    c = ModelConfig(**{**TINY, "max_seq_len": 160}, num_kv_heads=2, positions="rotary")
    params = random_params(c)
    tokens = jax.random.randint(jax.random.key(6), (1, 150), 0, c.vocab_size)  # 3 query blocks
    logits = jax.jit(Transformer(c).apply)(params, tokens)
    np.testing.assert_allclose(logits, np_forward(params, c, tokens), rtol=5e-4, atol=5e-4)


def naive_attention(q, k, v, mask):
    """Autodiff reference: repeated kv heads, one full score matrix."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    scores = jnp.where(mask[:, None], jnp.einsum("bqhd,bkhd->bhqk", q, k), -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("kind", ["full", "blocked", "fused"])
def test_attention_gradients_match_autodiff_of_a_naive_reference(kind):
    """'fused' is the cuDNN path's call made with XLA's implementation: same layout, mask, scale."""
    b, seq, h, kvh, d = 2, 150, 4, 2, 8
    q, k, v, g = (
        jax.random.normal(key, (b, seq, n, d))
        for key, n in zip(jax.random.split(jax.random.key(0), 4), (h, kvh, kvh, h))
    )
    segments = jnp.array([[1] * 70 + [2] * 80, [1] * 100 + [0] * 50])
    slots = jnp.broadcast_to(jnp.arange(seq), (b, seq))
    mask = attention.causal_segment_mask(segments, segments, slots, jnp.arange(seq))
    if kind == "fused":
        fn = functools.partial(attention.fused_attention, implementation="xla")
    else:
        f = attention.causal_attention if kind == "blocked" else attention.dot_product_attention
        fn = lambda q, k, v, mask: f(q, attention.heads_first(k), attention.heads_first(v), mask)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) * g)
    np.testing.assert_allclose(jax.jit(fn)(q, k, v, mask), naive_attention(q, k, v, mask), atol=1e-5)
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(naive_attention), argnums=(0, 1, 2)))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    c = STYLES["llama"]
    params = random_params(c)
    tokens = jax.random.randint(jax.random.key(7), (2, 12), 0, c.vocab_size)

    def grads(config):
        loss = lambda p: jnp.mean(Transformer(config).apply(p, tokens) ** 2)
        return jax.jit(jax.grad(loss))(params)

    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grads(c),
        grads(c.replace(remat=remat)),
    )


def test_dropout_needs_rng_and_changes_outputs():
    c = ModelConfig(**TINY, dropout=0.5)
    params = random_params(c)
    model = Transformer(c)
    tokens = jnp.ones((1, 6), jnp.int32)
    train = model.apply(params, tokens, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert np.abs(train - model.apply(params, tokens)).max() > 1e-2
    np.testing.assert_array_equal(model.apply(params, tokens), model.apply(params, tokens))


def test_bfloat16_compute_gives_float32_logits():
    c = STYLES["llama"].replace(dtype="bfloat16")
    params = random_params(c)
    tokens = jnp.arange(10)[None]
    logits = jax.jit(Transformer(c).apply)(params, tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, np_forward(params, c, tokens), atol=0.1 * np.abs(logits).max())


# ---------------------------------------------------------------- logical axis names
@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_parameter_has_logical_axis_names(style):
    c = STYLES[style]
    shapes = jax.eval_shape(Transformer(c).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    specs = nn.get_partition_spec(shapes)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(shapes))
    for (path, leaf), spec in zip(leaves, jax.tree_util.tree_leaves(specs)):
        assert len(spec) == leaf.ndim and None not in spec, jax.tree_util.keystr(path)
    p = jax.tree_util.tree_map(tuple, specs["params"], is_leaf=lambda x: isinstance(x, P))
    assert p["token_embed"]["embedding"] == (VOCAB, EMBED)
    assert p["layers_1"]["attn"]["query"]["kernel"] == (EMBED, HEADS, HEAD_DIM)
    assert p["layers_1"]["attn"]["key"]["kernel"] == (EMBED, KV_HEADS, HEAD_DIM)
    assert p["layers_1"]["attn"]["out"]["kernel"] == (HEADS, HEAD_DIM, EMBED)
    assert p["layers_0"]["mlp"]["wo"]["kernel"] == (MLP, EMBED)
    if style == "gpt2":
        assert p["pos_embed"]["embedding"] == (POSITIONS, EMBED)
        assert p["layers_0"]["mlp"]["wi"]["kernel"] == (EMBED, MLP)
        assert p["layers_0"]["ln_attn"]["bias"] == (EMBED,)
    else:
        assert p["lm_head"]["kernel"] == (EMBED, VOCAB)
        assert p["layers_0"]["mlp"]["wi_gate"]["kernel"] == (EMBED, MLP)
        assert set(p["ln_final"]) == {"scale"}


def test_init_scales():
    c = ModelConfig(**{**TINY, "d_model": 128, "d_ff": 512, "vocab_size": 500})
    p = nn.unbox(jax.jit(Transformer(c).init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))["params"]
    assert np.std(p["token_embed"]["embedding"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["layers_1"]["mlp"]["wi"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(p["layers_1"]["mlp"]["wo"]["kernel"]) == pytest.approx(0.02 / 2, rel=0.05)  # 2 layers
    assert np.std(p["layers_1"]["attn"]["out"]["kernel"]) == pytest.approx(0.02 / 2, rel=0.05)
    assert not np.any(p["layers_1"]["mlp"]["wi"]["bias"])


# ---------------------------------------------------------------- losses
def test_cross_entropy_with_mask_and_z_loss_by_hand():
    logits = np.array(
        [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], [[5.0, -1.0, 0.5], [100.0, 0.0, -100.0]]], np.float32
    )
    targets = np.array([[2, 1], [0, 2]], np.int32)
    mask = np.array([[1.0, 1.0], [0.0, 0.5]], np.float32)
    lse = [
        math.log(math.exp(1) + math.exp(2) + math.exp(3)),
        math.log(3.0),
        None,
        100.0 + math.log(1 + math.exp(-100) + math.exp(-200)),
    ]
    ce = (lse[0] - 3.0) + (lse[1] - 0.0) + 0.5 * (lse[3] + 100.0)
    z = 1e-3 * (lse[0] ** 2 + lse[1] ** 2 + 0.5 * lse[3] ** 2)
    loss_sum, z_sum, weight = losses.cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-3
    )
    assert float(weight) == 2.5
    assert float(z_sum) == pytest.approx(z, rel=1e-6)
    assert float(loss_sum) == pytest.approx(ce + z, rel=1e-6)
    no_z = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    assert float(no_z[0]) == pytest.approx(ce, rel=1e-6) and float(no_z[1]) == 0.0
