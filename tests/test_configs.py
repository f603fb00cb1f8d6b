"""Every config loads; the real sizes have the parameter counts they claim; the smoke variants run."""

import glob
import importlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from experiments.tasks import TASKS
from lm.flops import param_counts
from lm.model import Transformer
from lm.trainer import model_config

CONFIGS = sorted(
    os.path.relpath(p)[:-3].replace(os.sep, ".")
    for p in glob.glob("configs/*/*.py")
    if not p.endswith("__init__.py")
)


@pytest.mark.parametrize("module", CONFIGS)
def test_config_loads_with_and_without_smoke(module):
    config_module = importlib.import_module(module)
    assert config_module.get_config().task in TASKS
    smoke = config_module.get_config("smoke")
    if hasattr(config_module, "get_sweep"):  # members set sizes and budgets
        members = config_module.get_sweep("smoke")
        assert len(members) <= 2 and all(m.get("scaling.budget", 0) <= 1e11 for m in members)
    elif smoke.task == "recipe":  # each stage runs its own config's smoke variant
        assert all(
            smoke.recipe[stage].endswith(":smoke") for stage in ("pretrain", "sft", "reward", "ppo", "dpo")
        )
    elif smoke.task == "pretrain":
        assert smoke.model.num_layers <= 2 and smoke.train.steps <= 10
    else:  # later stages take their model from init_from
        assert smoke.train.steps <= 10


def real_count(module: str, vocab: int) -> int:
    config = importlib.import_module(module).get_config()
    model = Transformer(model_config(config, vocab))
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))


def test_real_sizes_have_exact_parameter_counts():
    assert real_count("configs.pretrain.gpt2", 50257) == 124_439_808
    llama = real_count("configs.pretrain.llama", 32000)
    # 24 x (q, o: 1024x1024; k, v: 1024x256; SwiGLU: 3 x 1024x2816; 2 norms) + final norm + 2 x 32000x1024
    assert llama == 336_118_784
    config = importlib.import_module("configs.pretrain.llama").get_config()
    assert param_counts(model_config(config, 32000))["total"] == llama


@pytest.mark.parametrize("spec", ["configs/pretrain/llama.py:smoke", "configs/pretrain/gpt2.py:smoke"])
def test_smoke_variant_trains_end_to_end(spec, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(open(os.path.join(os.path.dirname(json.__file__), "decoder.py")).read() * 4)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            f"--config={spec}",
            f"--workdir={tmp_path}/w",
            "--config.data.source=text_files",
            f"--config.data.files={text}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert records[-1]["loss"] < records[0]["loss"]
    assert {
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "eval_loss",
        "eval_bits_per_byte",
    } <= set(records[-1])
    saved = json.load(open(tmp_path / "w" / "config.json"))
    assert saved["run"]["peak_flops_source"] and saved["run"]["flops_per_token"] > 0
