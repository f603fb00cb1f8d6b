"""Schedules and the weight-decay mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import get_base_config
from lm.optim import learning_rate_schedule, weight_decay_mask


def schedule_values(kind, steps=1000, warmup=100, **kw):
    cfg = get_base_config().schedule
    cfg.kind, cfg.warmup_steps = kind, warmup
    for k, v in kw.items():
        cfg[k] = v
    fn = learning_rate_schedule(cfg, 1e-3, steps)
    return np.array([float(fn(s)) for s in range(steps + 1)])


def test_cosine_warms_up_then_ends_at_min_ratio():
    lr = schedule_values("cosine", min_lr_ratio=0.1)
    assert lr[0] == 0.0 and lr[50] == pytest.approx(5e-4) and lr[100] == pytest.approx(1e-3)
    assert lr[1000] == pytest.approx(1e-4, rel=1e-4)
    assert np.all(np.diff(lr[100:]) <= 1e-12)  # never rises after warmup
    assert lr[550] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)  # cosine midpoint


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    lr = schedule_values("wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert np.allclose(lr[100:820], 1e-3)
    assert lr[910] == pytest.approx(5e-4, rel=1e-3) and lr[1000] == pytest.approx(0.0, abs=1e-9)


def test_decay_mask_skips_norms_biases_and_embeddings():
    params = {
        "token_embed": {"embedding": jnp.zeros((4, 2))},
        "layers_0": {
            "attn": {"query": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}},
            "ln_attn": {"scale": jnp.zeros(2), "bias": jnp.zeros(2)},
        },
    }
    mask = weight_decay_mask(params)
    assert mask["layers_0"]["attn"]["query"] == {"kernel": True, "bias": False}
    assert mask["layers_0"]["ln_attn"] == {"scale": False, "bias": False}
    assert mask["token_embed"]["embedding"] is False
    assert weight_decay_mask(params, decay_embeddings=True)["token_embed"]["embedding"] is True
