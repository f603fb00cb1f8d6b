"""Sharded equals unsharded: data, FSDP and tensor parallel meshes on 8 simulated CPU devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.common import pretrain_config
from lm import sharding
from lm.losses import lm_loss
from lm.model import Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.train_state import init_state, jit_train_step
from lm.trainer import model_config

MESHES = {  # (data, fsdp, tensor) -> expected specs of the embedding, a query and an MLP kernel
    (8, 1, 1): (P(None, None), P(None, None, None), P(None, None)),
    (2, 2, 2): (P("tensor", "fsdp"), P("fsdp", "tensor", None), P("fsdp", "tensor")),
    (1, 8, 1): (P(None, "fsdp"), P("fsdp", None, None), P("fsdp", None)),
}


def small_config(style):
    c = pretrain_config()
    c.model.update(num_layers=2, d_model=64, num_heads=4, d_ff=128, max_seq_len=32)
    if style == "llama":
        c.model.update(
            positions="rotary",
            norm="rmsnorm",
            mlp="swiglu",
            tie_embeddings=False,
            use_bias=False,
            num_kv_heads=2,
        )
    c.optimizer.lr = 3e-3
    c.schedule.warmup_steps = 1
    c.train.steps = 5
    return c


def make_batch(seed=0, batch=16, seq=32, vocab=64):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq + 1)).astype(np.int32)
    segments = np.where(np.arange(seq)[None] < seq // 2 + rng.integers(-4, 4, size=(batch, 1)), 1, 2)
    starts = np.argmax(segments == 2, axis=1)[:, None]
    positions = np.where(segments == 1, np.arange(seq)[None], np.arange(seq)[None] - starts)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segments.astype(np.int32),
        "positions": positions.astype(np.int32),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


def effective_spec(spec, sizes) -> P:
    """The spec with mesh axes of size 1 dropped: how an array is really split."""

    def keep(entry):
        axes = [a for a in (entry if isinstance(entry, tuple) else (entry,)) if a and sizes[a] > 1]
        return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)

    return P(*map(keep, spec))


def train_on_mesh(config, mesh_shape, steps):
    """Returns (first-step grads, losses of `steps` steps, param PartitionSpecs) on a mesh."""
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)), devices)
    rules = sharding.axis_rules(config.axis_rules)
    model = Transformer(model_config(config, 64))
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    loss_fn = functools.partial(lm_loss, model=model, z_loss=1e-4)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = lambda rng: model.init(rng, jnp.zeros((1, 32), jnp.int32))["params"]
        state, shardings = init_state(init, tx, 0, mesh, rules)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        batch = sharding.global_batch(make_batch(), batch_sharding)
        grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, None)[0]))(state.params)
        step = jit_train_step(loss_fn, tx, schedule, 1, shardings, batch_sharding, mesh)
        losses = []
        for _ in range(steps):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
    specs = jax.tree.map(lambda x: effective_spec(x.sharding.spec, sizes), state.params)
    return jax.device_get(grads), np.array(losses), specs


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def reference(request):
    config = small_config(request.param)
    return config, train_on_mesh(config, (1, 1, 1), steps=5)


@pytest.mark.parametrize("mesh_shape", list(MESHES))
def test_sharded_matches_one_device(reference, mesh_shape):
    config, (ref_grads, ref_losses, _) = reference
    grads, losses, specs = train_on_mesh(config, mesh_shape, steps=5)
    np.testing.assert_allclose(losses[0], ref_losses[0], rtol=1e-5)
    leaves = list(zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)))
    total = np.sqrt(sum(np.sum(r.astype(np.float64) ** 2) for _, r in leaves))
    error = np.sqrt(sum(np.sum((g - r).astype(np.float64) ** 2) for (_, g), r in leaves))
    assert error / total < 1e-5
    for (path, g), r in leaves:
        # Leaves whose true gradient is zero (the key bias: softmax ignores a per-query shift) hold
        # only rounding noise, so a relative error means nothing there.
        if np.linalg.norm(r) > 1e-6 * total:
            assert np.linalg.norm(g - r) / np.linalg.norm(r) < 1e-5, jax.tree_util.keystr(path)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert losses[-1] < losses[0]  # the steps really trained
    embed, query, mlp_in = MESHES[mesh_shape]
    assert specs["token_embed"]["embedding"] == embed
    assert specs["layers_0"]["attn"]["query"]["kernel"] == query
    mlp = specs["layers_0"]["mlp"]
    assert (mlp["wi"] if "wi" in mlp else mlp["wi_gate"])["kernel"] == mlp_in


def test_gradient_accumulation_matches_one_big_batch():
    """grad_accum=4 on a data=2 x fsdp=2 mesh gives the same update as the whole batch at once."""
    config = small_config("gpt2")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    rules = sharding.axis_rules(config.axis_rules)
    model = Transformer(model_config(config, 64))
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    loss_fn = functools.partial(lm_loss, model=model, z_loss=0.0)
    batch = make_batch()
    batch["loss_mask"][:3, 5:] = 0.0  # uneven token counts across microbatches
    results = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for accum in (1, 4):
            init = lambda rng: model.init(rng, jnp.zeros((1, 32), jnp.int32))["params"]
            state, shardings = init_state(init, tx, 0, mesh, rules)
            batch_sharding = sharding.batch_sharding(mesh, rules)
            step = jit_train_step(loss_fn, tx, schedule, accum, shardings, batch_sharding, mesh)
            state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
            results.append((float(metrics["loss"]), jax.device_get(state.params)))
    (loss1, params1), (loss4, params4) = results
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
