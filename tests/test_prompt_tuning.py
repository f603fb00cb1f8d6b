"""Prompt and prefix tuning: the base stays bit-identical, only the prompt or prefixes (and the
reparameterisation MLP) train, the learned prompt changes the output, and the KV cache agrees."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from lm import lora, prompt_tuning, sharding
from lm.model import ModelConfig, Transformer, init_cache
from lm.tasks import sft
from lm.train_state import init_state, jit_train_step

CFG = ModelConfig(vocab_size=264, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_seq_len=64)
RULES = sharding.axis_rules(common.get_base_config().axis_rules)
PEFTS = {
    "prefix": prompt_tuning.PeftConfig(prefix_length=4),
    "reparam": prompt_tuning.PeftConfig(prefix_length=4, reparam_hidden=8),
    "prompt": prompt_tuning.PeftConfig(prompt_length=4),
}


def _batch(rows: int = 8, seq: int = 24) -> dict:
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 259, (rows, seq)).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": np.roll(inputs, -1, axis=1),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, seq), np.int32),
        "loss_mask": np.ones((rows, seq), np.float32),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "prefix",
        pytest.param("reparam", marks=pytest.mark.slow),
        pytest.param("prompt", marks=pytest.mark.slow),
    ],
)
def test_only_the_prompt_trains_and_changes_the_output(kind):
    peft = PEFTS[kind]
    cfg = CFG.replace(**peft.model_fields())
    base_model, model = Transformer(CFG), Transformer(cfg)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tx = optax.adam(3e-2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        init = lambda r: base_model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
        base_shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh, RULES)
        base = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=base_shardings)(jax.random.PRNGKey(0))
        before = jax.tree.map(np.asarray, base)
        state, shardings = init_state(
            lambda r: prompt_tuning.init_trainable(r, cfg, peft), tx, 0, mesh, RULES
        )
        start = jax.tree.map(np.asarray, state.params)
        loss_fn = lambda p, b, r, frozen: sft.sft_loss(  # noqa: E731
            p, b, r, frozen, model=model, lora_cfg=lora.LoraConfig(), z_loss=0.0, peft=peft
        )
        batch_sharding = sharding.batch_sharding(mesh, RULES)
        step = jit_train_step(
            loss_fn, tx, optax.constant_schedule(3e-2), 1, shardings, batch_sharding, mesh, base_shardings
        )
        batch = sharding.global_batch(_batch(), batch_sharding)
        losses = []
        for _ in range(5):
            state, metrics = step(state, batch, base)
            losses.append(float(metrics["loss"]))
        tuned = jax.jit(model.apply)(
            {"params": prompt_tuning.plain(base, state.params, cfg)}, batch["inputs"]
        )
        plain_out = jax.jit(base_model.apply)({"params": base}, batch["inputs"])
    assert losses[-1] < losses[0]
    assert all(
        np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base))
    )
    want = {"prefix": {"prefix_key", "prefix_value"}, "reparam": {"prefix_reparam"}, "prompt": {"prompt"}}[
        kind
    ]
    assert set(state.params) == want
    size = prompt_tuning.count(state.params)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * size  # Adam: mu, nu
    assert any(
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params))
    )
    assert float(jnp.abs(tuned - plain_out).max()) > 1e-3


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_cached_decoding_matches_the_full_forward(kind):
    cfg = CFG.replace(**PEFTS[kind].model_fields())
    model = Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 259, (2, 10)), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    apply = jax.jit(model.apply, static_argnames="method")
    full = apply(params, tokens)
    _, cache = apply(params, tokens[:, :7], init_cache(cfg, 2, 12), method="prefill")
    step, _ = apply(params, tokens[:, 7:8], cache, method="extend")
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, 7]), atol=1e-5)


def test_start_from_text_is_the_base_on_that_text():
    """Prefixes started from a text's keys and values give the base's output on that text followed
    by the sequence (at the sequence's own positions); a prompt starts at the text's embeddings."""
    base_model = Transformer(CFG)
    text = jnp.asarray([5, 6, 7, 8], jnp.int32)
    base = sharding.unboxed(base_model.init(jax.random.PRNGKey(0), text[None])["params"])
    for kind in ("prefix", "prompt"):
        peft = PEFTS[kind]
        cfg = CFG.replace(**peft.model_fields())
        trainable = sharding.unboxed(prompt_tuning.init_trainable(jax.random.PRNGKey(1), cfg, peft))
        started = prompt_tuning.start_from_text(trainable, base, cfg, text)
        if kind == "prompt":
            np.testing.assert_array_equal(started["prompt"], base["token_embed"]["embedding"][text])
        else:
            _, cache = base_model.apply({"params": base}, text[None], init_cache(CFG, 1, 4), method="prefill")
            np.testing.assert_array_equal(started["prefix_key"][1], cache["layers"][1]["key"][0])


def test_config_checks():
    import ml_collections

    from lm.errors import ConfigError

    c = ml_collections.ConfigDict(
        {
            "prefix": {"length": 4, "reparam_hidden": 0, "lr": 0.0},
            "prompt_tuning": {"length": 0, "lr": 0.0},
            "lora": {"rank": 8},
        }
    )
    with pytest.raises(ConfigError, match="one of them at a time"):
        prompt_tuning.from_config(c)
    c.lora.rank, c.prefix.length = 0, -1
    with pytest.raises(ConfigError, match="config.prefix.length=-1"):
        prompt_tuning.from_config(c)
