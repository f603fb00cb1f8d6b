"""LoRA and QLoRA: NF4 storage, the adapted forward, merging, gradients, dropout and sharding."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from configs.common import get_base_config, sft_config
from lm import lora, losses, quant, sharding
from lm.errors import ConfigError
from lm.model import Linear, ModelConfig, Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.train_state import init_state, train_step

# The NF4 values as listed in the QLoRA paper's appendix (arXiv:2305.14314) and in bitsandbytes.
PAPER_NF4 = [
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
]
SMALL = dict(vocab_size=64, num_layers=2, num_heads=4, d_model=64, d_ff=128, max_seq_len=32)
STYLES = {
    "gpt2": ModelConfig(**SMALL),
    "llama": ModelConfig(
        **SMALL,
        num_kv_heads=2,
        positions="rotary",
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=False,
        use_bias=False,
        remat="full",
    ),  # adapters inside nn.remat
}
ALL_LINEAR = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=tuple(lora.INPUT_AXES))


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tree_rel(a, b) -> float:
    """Relative error of two pytrees taken as one vector."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    num = sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2) for x, y in pairs)
    return float(np.sqrt(num / sum(np.sum(np.asarray(y, np.float64) ** 2) for _, y in pairs)))


def tokens_for(seed=0, batch=2, seq=16):
    return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], (batch, seq)).astype(np.int32)


# Tests share host-side parameters and jitted functions: on a shared 2-core CPU the XLA compiles,
# not the arithmetic, are what takes the time.
@functools.lru_cache
def setup(style):
    """(model, boxed abstract params, host params): Gaussian std 0.02 and norm scales 1."""
    model = Transformer(STYLES[style])
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    draw = lambda p, x: np.ones(x.shape) if p[-1] == "scale" else 0.02 * rng.standard_normal(x.shape)
    flat = traverse_util.flatten_dict(nn.unbox(abstract))
    return (
        model,
        abstract,
        traverse_util.unflatten_dict({p: draw(p, x).astype(np.float32) for p, x in flat.items()}),
    )


@functools.lru_cache
def adapters_for(style, cfg=ALL_LINEAR, b_std=0.05):
    """Host adapters (A from `init_adapters`) with B = 0 and with B drawn at random."""
    _, abstract, _ = setup(style)
    init = jax.jit(lambda r: nn.unbox(lora.init_adapters(r, abstract, cfg)))
    zero_b = jax.device_get(init(jax.random.key(1)))
    rng = np.random.default_rng(1)
    random_b = jax.tree_util.tree_map_with_path(
        lambda p, x: (b_std * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].key == "b" else x,
        zero_b,
    )
    return zero_b, random_b


@functools.lru_cache
def jitted(style, cfg=ALL_LINEAR):
    """Jitted forward passes and a gradient of the adapted model of `style`."""
    model = setup(style)[0]
    lora_forward = lambda p, a, t, rng=None: lora.apply(
        model, p, a, cfg, t, rng=rng, deterministic=rng is None
    )
    loss = lambda a, p, t: jnp.mean(jax.nn.log_softmax(lora_forward(p, a, t))[..., 3])
    return {
        "lora": jax.jit(lora_forward),
        "grad": jax.jit(jax.grad(loss)),
        "base": jax.jit(lambda p, t: model.apply({"params": p}, t)),
        "merge": jax.jit(lambda p, a: lora.merge(p, a, cfg)),
    }


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


def test_quantize_params_replaces_only_chosen_kernels():
    _, _, params = setup("llama")
    q = quant.quantize_params(params, lora.is_linear_kernel)
    attn = q["layers_0"]["attn"]
    assert isinstance(attn["query"]["kernel"], quant.NF4Tensor)
    assert attn["query"]["kernel"].shape == params["layers_0"]["attn"]["query"]["kernel"].shape
    assert not isinstance(q["lm_head"]["kernel"], quant.NF4Tensor)
    assert not isinstance(q["token_embed"]["embedding"], quant.NF4Tensor)
    back = quant.dequantize_params(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)


# ----------------------------------------------------------------------------------------- LoRA
def test_config_checks():
    with pytest.raises(ConfigError, match="targets"):
        lora.LoraConfig(rank=4, targets=("qkv",))
    with pytest.raises(ConfigError, match="rank"):
        lora.LoraConfig(rank=-1)
    assert lora.LoraConfig(rank=8, alpha=16.0).scale == 2.0


def test_adapters_mirror_targets_with_axis_names():
    _, abstract, _ = setup("gpt2")
    cfg = lora.LoraConfig(rank=4, targets=("query", "out", "wo"))
    adapters = jax.eval_shape(lambda r: lora.init_adapters(r, abstract, cfg), jax.random.key(0))
    assert set(adapters) == {"layers_0", "layers_1"}
    layer = adapters["layers_0"]
    assert set(layer["attn"]) == {"query", "out"} and set(layer["mlp"]) == {"wo"}
    q, o = layer["attn"]["query"], layer["attn"]["out"]
    assert q["a"].value.shape == (64, 4) and q["a"].names == ("embed", None)
    assert q["b"].value.shape == (4, 4, 16) and q["b"].names == (None, "heads", "head_dim")
    assert o["a"].value.shape == (4, 16, 4) and o["a"].names == ("heads", "head_dim", None)
    assert o["b"].names == (None, "embed")
    # Per layer: query 64*4 + 4*64, out 64*4 + 4*64, wo 128*4 + 4*64.
    assert lora.trainable_count(adapters) == 2 * (512 + 512 + 768)
    assert lora.init_adapters(jax.random.key(0), abstract, lora.LoraConfig(rank=0)) == {}
    zero_b, _ = adapters_for("gpt2")
    query = zero_b["layers_0"]["attn"]["query"]
    np.testing.assert_array_equal(query["b"], 0.0)
    assert abs(np.std(query["a"]) * math.sqrt(64) - 1) < 0.2  # std 1 / sqrt(fan_in)


@pytest.mark.parametrize("style", list(STYLES))
def test_adapted_forward_equals_base_then_merged(style):
    _, _, params = setup(style)
    zero_b, adapters = adapters_for(style)
    fn, tokens = jitted(style), tokens_for()
    base = fn["base"](params, tokens)
    np.testing.assert_array_equal(fn["lora"](params, zero_b, tokens), base)  # B = 0: exactly
    adapted = fn["lora"](params, adapters, tokens)
    assert rel(adapted, base) > 0.1  # the adapters really change the logits
    assert rel(adapted, fn["base"](fn["merge"](params, adapters), tokens)) < 1e-5  # measured ~1e-6
    if style == "gpt2":  # rank 0: no adapters, the base model
        np.testing.assert_array_equal(fn["lora"](params, {}, tokens), base)


def test_modules_to_save_replace_the_base_and_merge():
    """A saved module is a trained copy of the base's: it starts equal, its change shows in the
    adapted forward and in the merged params, and the frozen base keeps the old values."""
    model, abstract, params = setup("gpt2")
    cfg = lora.LoraConfig(rank=4, targets=("query",), modules_to_save=("token_embed", "ln_final"))
    shapes = jax.eval_shape(lambda r: lora.init_adapters(r, abstract, cfg), jax.random.key(0))
    assert set(shapes) == {"layers_0", "layers_1", "token_embed", "ln_final"}
    assert shapes["token_embed"]["embedding"].names == abstract["token_embed"]["embedding"].names
    trainable = lora.copy_saved_modules(
        nn.unbox(lora.init_adapters(jax.random.key(0), abstract, cfg)), params, cfg
    )
    tokens = tokens_for()
    forward = jax.jit(lambda p, a: lora.apply(model, p, a, cfg, tokens))
    plain = jax.jit(lambda p: model.apply({"params": p}, tokens))
    base = plain(params)
    np.testing.assert_array_equal(forward(params, trainable), base)
    trainable["token_embed"] = {"embedding": trainable["token_embed"]["embedding"] * 1.5}
    changed = forward(params, trainable)
    assert rel(changed, base) > 0.1
    merged = lora.merge(params, trainable, cfg)
    assert rel(plain(merged), changed) < 1e-5
    np.testing.assert_array_equal(
        merged["token_embed"]["embedding"], params["token_embed"]["embedding"] * 1.5
    )
    with pytest.raises(ConfigError, match="modules_to_save"):
        lora.LoraConfig(rank=4, modules_to_save=("layers_0",))
    with pytest.raises(ConfigError, match="no such module"):
        lora.init_adapters(jax.random.key(0), abstract, lora.LoraConfig(rank=4, modules_to_save=("lm_head",)))


def test_single_linear_gradients_match_manual():
    layer = Linear((2, 3), (4,), ("heads", "head_dim", "embed"), ModelConfig(**SMALL))
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal((5, 6), np.float32), rng.standard_normal((5, 4), np.float32)  # g = dL/dy
    params = {"kernel": rng.standard_normal((2, 3, 4), np.float32), "bias": np.arange(4.0, dtype=np.float32)}
    adapters = {"a": rng.standard_normal((2, 3, 2), np.float32), "b": rng.standard_normal((2, 4), np.float32)}
    cfg = lora.LoraConfig(rank=2, alpha=3.0, targets=("out",))

    def loss(adapters, params):
        with lora.adapted(cfg):
            y = layer.apply({"params": params, lora.COLLECTION: adapters}, x)
        return jnp.sum(y * g), y

    grad = jax.jit(jax.grad(loss, has_aux=True))
    grads, y = grad(adapters, params)
    w, a, b, s = params["kernel"].reshape(6, 4), adapters["a"].reshape(6, 2), adapters["b"], 1.5
    np.testing.assert_allclose(y, x @ w + params["bias"] + s * x @ a @ b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["a"].reshape(6, 2), s * x.T @ g @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["b"], s * (x @ a).T @ g, rtol=1e-5, atol=1e-5)
    # At LoRA's init (B = 0) only B gets a gradient.
    grads0, _ = grad(dict(adapters, b=np.zeros((2, 4), np.float32)), params)
    np.testing.assert_array_equal(grads0["a"], 0.0)
    assert float(jnp.abs(grads0["b"]).max()) > 0.1


def test_dropout_only_when_not_deterministic():
    _, _, params = setup("gpt2")
    zero_b, adapters = adapters_for("gpt2")
    fn, tokens = jitted("gpt2"), tokens_for()
    r1, r2 = jax.random.key(5), jax.random.key(6)
    eval_out = fn["lora"](params, adapters, tokens)
    train1, train2 = fn["lora"](params, adapters, tokens, r1), fn["lora"](params, adapters, tokens, r2)
    np.testing.assert_array_equal(train1, fn["lora"](params, adapters, tokens, r1))
    assert rel(train1, eval_out) > 1e-3 and rel(train1, train2) > 1e-3
    # Dropout acts on the LoRA input only (the model's own dropout is 0): with B = 0 the output
    # is the base model's.
    np.testing.assert_array_equal(fn["lora"](params, zero_b, tokens, r1), fn["base"](params, tokens))


# ---------------------------------------------------------------------------------------- QLoRA
def test_qlora_forward_and_gradients_close_to_float_lora():
    """Tolerance: NF4 moves each Linear kernel by its quantisation error, 9.2% of its norm for
    Gaussian weights (`test_nf4_storage_and_round_trip`), and that error propagates to the logits.
    Measured here: logits move by 8.5% of their norm under NF4 (with double quantisation), 9.8%
    under Gaussian noise of the same size on every Linear kernel, and 128% with freshly drawn
    kernels; adapter gradients move by 12%. So the bounds: logits < 12% (1.3x the weight error),
    within 2x of same-size noise (the error is unbiased noise, not a systematic scale or packing
    fault, which would move them like fresh kernels), < 0.2x the fresh-kernel change; gradients
    < 25%."""
    _, _, params = setup("llama")
    _, adapters = adapters_for("llama")
    fn, tokens = jitted("llama"), tokens_for(batch=4, seq=32)
    q_params = quant.quantize_params(params, lora.is_linear_kernel, double_quant=True)
    shapes = lambda p: jax.eval_shape(lambda r: lora.init_adapters(r, p, ALL_LINEAR), jax.random.key(0))
    assert shapes(q_params) == shapes(params)  # adapters can be made from the NF4 base too
    exact, nf4 = fn["lora"](params, adapters, tokens), fn["lora"](q_params, adapters, tokens)
    # The NF4 path itself is exact: it equals the float model on the dequantised weights.
    assert rel(nf4, fn["base"](fn["merge"](q_params, adapters), tokens)) < 1e-5

    flat, q_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(q_params)
    rng = np.random.default_rng(7)

    def replace_kernels(fn):
        return traverse_util.unflatten_dict(
            {p: fn(p, x).astype(np.float32) if lora.is_linear_kernel(p) else x for p, x in flat.items()}
        )

    rms = lambda x: np.sqrt(np.mean(np.square(x)))
    noisy = replace_kernels(
        lambda p, x: x + rms(quant.dequantize(q_flat[p]) - x) * rng.standard_normal(x.shape)
    )
    fresh = replace_kernels(lambda p, x: rms(x) * rng.standard_normal(x.shape))
    nf4_error, noise_error = rel(nf4, exact), rel(fn["lora"](noisy, adapters, tokens), exact)
    fresh_error = rel(fn["lora"](fresh, adapters, tokens), exact)
    print(
        f"logits relative error: nf4 {nf4_error:.4f}, same-size noise {noise_error:.4f}, "
        f"fresh kernels {fresh_error:.4f}"
    )
    assert nf4_error < 0.12
    assert 0.5 < nf4_error / noise_error < 2
    assert nf4_error < 0.2 * fresh_error

    grads, q_grads = fn["grad"](adapters, params, tokens), fn["grad"](adapters, q_params, tokens)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)  # only adapters
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))  # every adapter
    print(f"adapter gradient relative error: {tree_rel(q_grads, grads):.4f}")
    assert tree_rel(q_grads, grads) < 0.25


# ------------------------------------------------------------------------------------- sharding
def make_batch(seed=0, batch=8, seq=32):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SMALL["vocab_size"], size=(batch, seq + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)),
        "segment_ids": np.ones((batch, seq), np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def lora_loss(adapters, batch, rng, *, base_params, model, lora_cfg):
    """A LoRA task's loss_fn: the base params arrive as an argument of the jitted step."""
    logits = lora.apply(
        model,
        base_params,
        adapters,
        lora_cfg,
        batch["inputs"],
        rng=rng,
        deterministic=rng is None,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    loss_sum, _, weight = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss_sum, {"weight": weight}


def on_mesh(mesh_shape):
    """(mesh, rules) from the default config on the first prod(mesh_shape) devices."""
    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    return mesh, sharding.axis_rules(get_base_config().axis_rules)


def sharded_loss_and_grads(style, mesh_shape):
    """Loss and adapter gradients (random B) with base and adapters sharded; adapter specs."""
    model, abstract, params = setup(style)
    _, adapters = adapters_for(style)
    mesh, rules = on_mesh(mesh_shape)
    loss_fn = functools.partial(lora_loss, model=model, lora_cfg=ALL_LINEAR)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        base = jax.device_put(params, sharding.tree_shardings(abstract, mesh, rules))
        adapter_shapes = jax.eval_shape(
            lambda r: lora.init_adapters(r, abstract, ALL_LINEAR), jax.random.key(0)
        )
        adapters = jax.device_put(adapters, sharding.tree_shardings(adapter_shapes, mesh, rules))
        batch = sharding.global_batch(make_batch(), sharding.batch_sharding(mesh, rules))
        value_and_grad = jax.jit(jax.value_and_grad(lambda a, b, p: loss_fn(a, b, None, base_params=p)[0]))
        loss, grads = value_and_grad(adapters, batch, base)
    return float(loss), jax.device_get(grads), jax.tree.map(lambda x: x.sharding.spec, adapters)


@pytest.mark.parametrize("style", list(STYLES))
def test_sharded_lora_matches_one_device(style):
    loss1, grads1, _ = sharded_loss_and_grads(style, (1, 1, 1))
    loss8, grads8, specs = sharded_loss_and_grads(style, (2, 2, 2))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    assert tree_rel(grads8, grads1) < 1e-5
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads8), jax.tree.leaves(grads1)):
        assert rel(g, r) < 1e-5, jax.tree_util.keystr(path)
    query = specs["layers_0"]["attn"]["query"]
    assert query["a"] == P("fsdp", None) and query["b"] == P(None, "tensor", None)
    assert specs["layers_1"]["mlp"]["wo"]["a"] == P("tensor", None)


def test_lora_train_step_with_base_as_argument():
    """The trainer's recipe: adapters as the TrainState params (created sharded by `init_state`),
    the frozen base an argument of the jitted step, and LoRA dropout on."""
    model, abstract, params = setup("llama")
    mesh, rules = on_mesh((2, 2, 2))
    config = sft_config()
    config.schedule.update(kind="constant", warmup_steps=0)
    schedule = learning_rate_schedule(config.schedule, 1e-2, 10)
    tx = make_optimizer(config.optimizer, schedule)
    loss_fn = functools.partial(lora_loss, model=model, lora_cfg=ALL_LINEAR)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        base_shardings = sharding.tree_shardings(abstract, mesh, rules)
        base = jax.device_put(params, base_shardings)
        state, state_shardings = init_state(
            lambda rng: lora.init_adapters(rng, abstract, ALL_LINEAR), tx, 0, mesh, rules
        )
        batch_sharding = sharding.batch_sharding(mesh, rules)

        def step(state, batch, base):
            return train_step(
                state, batch, loss_fn=functools.partial(loss_fn, base_params=base), tx=tx, schedule=schedule
            )

        step = jax.jit(
            step,
            in_shardings=(state_shardings, batch_sharding, base_shardings),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        batch = sharding.global_batch(make_batch(), batch_sharding)
        losses = []
        for _ in range(4):
            state, metrics = step(state, batch, base)
            losses.append(float(metrics["loss"]))
    assert state.params["layers_0"]["attn"]["query"]["a"].sharding.spec == P("fsdp", None)
    assert losses[0] == pytest.approx(np.log(SMALL["vocab_size"]), rel=0.05)  # near-uniform start
    assert losses[-1] < losses[0] - 0.05, losses  # only adapters train, and they do
