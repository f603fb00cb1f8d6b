"""The benchmark harness on the smoke config: JSON figures with the required names and positive
values; the PyTorch baseline (when torch is installed) has our parameter count and loss at init."""

import importlib.util
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lm import flops
from lm.errors import ConfigError
from lm.model import Transformer
from lm.trainer import model_config
from tools import bench

SMOKE = "configs/pretrain/tiny.py:smoke"
ONE_LAYER = "--config.model.num_layers=1"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def figures(path, bench_name):
    """{name: record} of one bench's JSON lines."""
    records = [json.loads(line) for line in open(path)]
    assert all(set(r) >= {"bench", "name", "value", "unit"} for r in records)
    return {r["name"]: r for r in records if r["bench"] == bench_name}


def test_train_writes_required_figures(tmp_path):
    out = tmp_path / "bench.jsonl"
    torch_modes = "eager" if HAS_TORCH else "none"
    assert (
        bench.main(
            [
                "train",
                "--config",
                SMOKE,
                ONE_LAYER,
                "--steps",
                "1",
                "--repeats",
                "1",
                "--matmul_n",
                "256",
                "--torch",
                torch_modes,
                "--json",
                str(out),
            ]
        )
        == 0
    )
    train = figures(out, "train")
    required = ["peak_flops", "tokens_per_sec", "mfu", "peak_memory_bytes", "step_temp_bytes"]
    required += ["torch_eager_tokens_per_sec", "torch_eager_mfu", "vs_torch_eager"] if HAS_TORCH else []
    for name in required:
        assert train[name]["value"] > 0, name
    assert "RSS" in train["peak_memory_bytes"]["note"] or "device" in train["peak_memory_bytes"]["note"]


def test_decode_writes_required_figures_and_compiles_each_generator_once(tmp_path):
    out = tmp_path / "bench.jsonl"
    assert (
        bench.main(
            [
                "decode",
                "--config",
                SMOKE,
                ONE_LAYER,
                "--new_tokens",
                "8",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    decode = figures(out, "decode")
    for name in ["cache_tokens_per_sec", "recompute_tokens_per_sec", "cache_vs_recompute"]:
        assert decode[name]["value"] > 0, name
    # Each generator compiles once (in its warm-up) for all 8 steps, and never in the timed calls.
    assert decode["recompute_compiles"]["value"] == 1 and decode["cache_compiles"]["value"] == 1
    assert decode["timed_compiles"]["value"] == 0


def test_overrides_take_the_type_of_the_default():
    c = bench.load_config(
        None,
        [
            "--config.model.remat=full",
            "--config.train.grad_accum=2",
            "--config.model.use_bias=true",
            "--config.optimizer.lr=3e-4",
        ],
    )
    assert (c.model.remat, c.train.grad_accum, c.model.use_bias, c.optimizer.lr) == ("full", 2, True, 3e-4)
    with pytest.raises(ConfigError, match="no such config key"):
        bench.load_config(None, ["--config.model.rematt=full"])


def test_missing_torch_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    runners, failures = bench.torch_runners(None, None, None, ("eager", "compile"), 1)
    assert runners == {} and "not installed" in failures["compile"]
    figures = bench.torch_figures("compile", None, failures["compile"], "", 1.0, 1.0, 1.0)
    assert figures["vs_torch_compile"].value is None and "not installed" in figures["vs_torch_compile"].note


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (the [bench] extra)")
@pytest.mark.parametrize("use_bias", [True, False])
def test_torch_baseline_has_our_parameter_count_and_loss_at_init(use_bias):
    from tools import torch_baseline

    config = bench.load_config(SMOKE, [f"--config.model.use_bias={use_bias}"])
    model_cfg = model_config(config, config.tokenizer.vocab_size)
    shapes = jax.eval_shape(
        lambda: Transformer(model_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    )
    ours = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert torch_baseline.num_params(model_cfg) == ours == flops.param_counts(model_cfg)["total"]
    tokens = bench.random_tokens(model_cfg.vocab_size, 4, 32)
    assert abs(torch_baseline.init_loss(model_cfg, tokens) - math.log(model_cfg.vocab_size)) < 0.05
