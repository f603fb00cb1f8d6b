"""SFT: response-only loss, frozen LoRA bases, the run end to end, export, sampling, bad data."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm import checkpoint, lora, sharding
from lm.data import sft as sft_data
from lm.data.tokenizer import ByteTokenizer
from lm.model import ModelConfig, Transformer
from lm.tasks import sft
from lm.train_state import init_state, jit_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(
    vocab_size=264,  # divisible by the tensor axis
    num_layers=2,
    num_heads=4,
    d_model=32,
    d_ff=64,
    max_seq_len=64,
)
EXAMPLES = [
    {"prompt": "Add: 12 + 30", "response": "42"},
    {"prompt": "Reverse: word", "response": "drow"},
    {"prompt": "Sort: 3 1 2", "response": "1 2 3"},
]


def packed_batch():
    tok = ByteTokenizer()
    tokens, prompt_lengths = sft_data.tokenize_examples(tok, {}, EXAMPLES)
    rows = sft_data.pack_examples(tokens, prompt_lengths, 48, tok.bos_id, tok.pad_id)
    return {k: jnp.asarray(v) for k, v in rows.rows(np.arange(rows.num_rows)).items()}


def test_prompt_targets_change_nothing():
    """Rewriting every target outside the loss mask (the prompt's) leaves loss and gradient as they are."""
    model = Transformer(CFG)
    batch = packed_batch()
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    params = sharding.unboxed(params)
    mask = batch["loss_mask"]
    assert 0 < float(mask.sum()) < float((batch["segment_ids"] > 0).sum())
    changed = {**batch, "targets": jnp.where(mask > 0, batch["targets"], (batch["targets"] + 7) % 259)}
    assert not bool(jnp.all(changed["targets"] == batch["targets"]))
    loss = lambda p, b: sft.sft_loss(p, b, None, model=model, lora_cfg=lora.LoraConfig(), z_loss=1e-4)[0]
    (l1, g1), (l2, g2) = [jax.value_and_grad(loss)(params, b) for b in (batch, changed)]
    assert float(l1) == float(l2)
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))


def test_lora_steps_leave_the_base_alone():
    """Training steps change the adapters only; the base gets no optimizer state and stays bit-identical."""
    model, lcfg = Transformer(CFG), lora.LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "wi"))
    batch = packed_batch()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.axis_rules(
        [
            ("batch", ("data", "fsdp")),
            ("embed", "fsdp"),
            ("mlp", "tensor"),
            ("heads", "tensor"),
            ("kv_heads", "tensor"),
            ("vocab", "tensor"),
        ]
    )
    tx = optax.adam(1e-2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        base_shardings = sharding.tree_shardings(abstract, mesh, rules)
        base = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=base_shardings)(jax.random.PRNGKey(0))
        before = jax.tree.map(np.asarray, base)
        state, shardings = init_state(lambda r: lora.init_adapters(r, abstract, lcfg), tx, 0, mesh, rules)
        adapters0 = jax.tree.map(np.asarray, state.params)
        loss_fn = lambda p, b, r, frozen: sft.sft_loss(
            p, b, r, frozen, model=model, lora_cfg=lcfg, z_loss=0.0
        )
        batch_sharding = sharding.batch_sharding(mesh, rules)
        step = jit_train_step(
            loss_fn, tx, optax.constant_schedule(1e-2), 1, shardings, batch_sharding, mesh, base_shardings
        )
        batch = sharding.global_batch(
            {k: np.resize(np.asarray(v), (8, v.shape[1])) for k, v in batch.items()}, batch_sharding
        )
        losses = []
        for _ in range(4):
            state, metrics = step(state, batch, base)
            losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert all(
        np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base))
    )
    adapter_size = sum(x.size for x in jax.tree.leaves(adapters0))
    assert adapter_size == lora.trainable_count(state.params)
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim) == 2 * adapter_size  # Adam: mu, nu
    assert any(
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(adapters0), jax.tree.leaves(state.params))
    )


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pre")
    result = run("-m", "experiments.run", "--config=configs/pretrain/tiny.py:smoke", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-2000:]
    return str(workdir)


@pytest.mark.parametrize("variant", ["full", "qlora"])
def test_sft_run_evaluates_trains_keeps_best_and_exports(pretrained, tmp_path, variant):
    workdir = tmp_path / "sft"
    # Adapters train at a larger learning rate than full fine-tuning (config.lora.lr).
    # Adapters alone here (the config also trains the embeddings in LoRA runs): a frozen NF4 base.
    extra = (
        [
            "--config.lora.rank=4",
            "--config.lora.quantize=nf4",
            "--config.lora.lr=1e-2",
            "--config.lora.modules_to_save=()",
        ]
        if variant == "qlora"
        else []
    )
    result = run(
        "-m",
        "experiments.run",
        "--config=configs/sft/tasks_tiny.py:smoke",
        f"--workdir={workdir}",
        f"--config.init_from={pretrained}",
        "--config.optimizer.lr=3e-3",
        *extra,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    evals = [r for r in records if "eval_grader_score" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 6
    assert {"eval_exact_match", "eval_score_add", "eval_exact_reverse"} <= set(evals[0])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.05  # the response loss falls in 6 steps
    config = json.loads((workdir / "config.json").read_text())
    total, trained = config["run"]["params"], config["run"]["trainable_params"]
    assert (trained == total) if variant == "full" else (0 < trained < total / 5)
    best = json.loads(
        open(
            workdir / "best" / str(checkpoint.latest_step_in(str(workdir / "best"))) / "meta" / "metadata"
        ).read()
    )
    assert best["eval_grader_score"] == max(r["eval_grader_score"] for r in evals)

    out = tmp_path / "exported"
    assert (
        run("-m", "tools.export", f"--workdir={workdir}", f"--out={out}", "--checkpoint=latest").returncode
        == 0
    )
    sample = run(
        "-m",
        "tools.sample",
        f"--workdir={out}",
        "--chat",
        "--prompt=Add: 1 + 2",
        "--prompt=Reverse: longer word",
        "--temperature=0",
        "--max_new_tokens=4",
    )
    assert sample.returncode == 0 and "User: Reverse: longer word\nAssistant: " in sample.stdout, (
        sample.stderr
    )


def test_malformed_alpaca_file_stops_before_training(pretrained, tmp_path):
    bad = tmp_path / "bad_alpaca.json"
    bad.write_text(
        '[{"instruction": "Say hi", "input": "", "output": "hi"},\n'
        ' {"instruction": "Add 2 and 3", "input": ""}]\n'
    )
    result = run(
        "-m",
        "experiments.run",
        "--config=configs/sft/alpaca.py:smoke",
        f"--workdir={tmp_path / 'w'}",
        f"--config.init_from={pretrained}",
        f"--config.data.files={bad}",
        "--config.train.seq_len=64",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad_alpaca.json[1]" in errors[0] and "output" in errors[0], result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()
