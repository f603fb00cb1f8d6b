"""Reward model: the last-token head, comparison arrays, HH triples, the run end to end, bad input."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import losses, saved_model, sharding
from lm.data import comparison_batches, graded_tasks, pipeline, preferences
from lm.data.tokenizer import ByteTokenizer
from lm.errors import DataError
from lm.heads import RewardModel
from lm.model import ModelConfig, Transformer
from lm.tasks import reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH_FILE = os.path.join(ROOT, "..", "shared", "data", "hh_rlhf_harmless_base_test.jsonl")
CFG = ModelConfig(vocab_size=264, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_seq_len=64)


def random_params(module, *args):
    """Parameters shaped as `module.init(rng, *args)`'s, drawn by numpy (Flax's init compiles slowly)."""
    shapes = sharding.unboxed(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"])
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


def test_reward_model_scores_the_last_valid_token():
    model = RewardModel(CFG)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, (2, 16)), jnp.int32)
    last = jnp.array([5, 9], jnp.int32)
    params, lm_params = random_params(model, tokens, last), random_params(Transformer(CFG), tokens)
    assert set(params) == {"lm", "head"}
    assert jax.tree.structure(params["lm"]) == jax.tree.structure(lm_params)  # an LM checkpoint drops in
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, last))
    score = lambda p, t: np.asarray(apply(p, t))  # noqa: E731
    base = score(params, tokens)
    assert base.shape == (2,) and base.dtype == np.float32
    padding_changed = tokens.at[0, 6:].add(1).at[1, 10:].add(1)
    np.testing.assert_array_equal(score(params, padding_changed), base)
    response_changed = score(params, tokens.at[0, 4].add(1))
    assert response_changed[0] != base[0] and response_changed[1] == base[1]
    assert score({**params, "lm": lm_params}, tokens).shape == (2,)


def test_likelihood_term_adds_the_weighted_mean_response_logprob():
    model, plain = RewardModel(CFG, likelihood_term=True), RewardModel(CFG)
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 250, (2, 16)), jnp.int32)
    first, last = jnp.array([3, 6], jnp.int32), jnp.array([5, 12], jnp.int32)
    params = random_params(model, tokens, last, first)
    assert set(params) == {"lm", "head", "likelihood_weight"}
    params = {**params, "likelihood_weight": jnp.float32(0.7)}
    plain_params = {"lm": params["lm"], "head": params["head"]}
    score = np.asarray(model.apply({"params": params}, tokens, last, first))
    head_only = np.asarray(plain.apply({"params": plain_params}, tokens, last))
    logits = Transformer(CFG).apply({"params": params["lm"]}, tokens)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for row in range(2):
        mean = np.mean(
            [logp[row, t - 1, int(tokens[row, t])] for t in range(int(first[row]), int(last[row]) + 1)]
        )
        assert score[row] == pytest.approx(head_only[row] + 0.7 * mean, abs=1e-4)
    # read at every position (PPO's value model) it is the head alone
    np.testing.assert_allclose(
        model.apply({"params": params}, tokens), plain.apply({"params": plain_params}, tokens), rtol=1e-6
    )
    with pytest.raises(ValueError, match="first_index"):
        model.apply({"params": params}, tokens, last)
    initial = sharding.unboxed(model.init(jax.random.PRNGKey(0), tokens, last, first)["params"])
    assert not np.any(np.asarray(initial["head"]["kernel"])) and float(initial["likelihood_weight"]) == 1.0


def test_comparisons_ranks_ties_and_label_noise():
    assert preferences.dense_ranks([0.5, 1.0, 0.5, 0.0]) == [1, 0, 1, 2]
    groups = [[[1, 5, 2], [1, 6, 6, 2], [1, 2]], [[1, 7, 2], [1, 8, 2]]]
    c = preferences.build_comparisons(groups, [[1, 0, 1], [0, 0]], [1, 1], seq_len=6, pad_id=0)
    assert c.tokens.shape == (2, 3, 6) and c.tokens[0, 1].tolist() == [1, 6, 6, 2, 0, 0]
    assert c.last_index.tolist() == [[2, 3, 1], [2, 2, 0]]
    assert c.first_index.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert c.mask.tolist() == [[True, True, True], [True, True, False]]
    assert preferences.pair_counts(c.ranks, c.mask).tolist() == [2, 0]  # ties form no pair
    kept = preferences.with_pairs(c)
    assert kept.num_prompts == 1 and kept.num_pairs() == 2
    _, _, weight = losses.ranking_loss(jnp.zeros((2, 3)), c.ranks, c.mask)
    assert float(weight) == 1.0
    np.testing.assert_array_equal(preferences.reverse_rankings(c.ranks, c.mask, 0.0, seed=0), c.ranks)
    assert preferences.reverse_rankings(c.ranks, c.mask, 1.0, seed=0).tolist() == [[0, 1, 0], [0, 0, 0]]
    ranks, mask = np.tile([0, 1], (4000, 1)), np.ones((4000, 2), bool)
    swapped = preferences.reverse_rankings(ranks, mask, 0.3, seed=0)[:, 0] == 1
    assert abs(swapped.mean() - 0.3) < 0.03


def test_length_grouped_batches_cover_their_megabatch_and_trimming_changes_no_score():
    lengths = np.random.default_rng(0).integers(5, 90, size=100)
    batches = [preferences.grouped_batch_ids(lengths, t, 8, seed=3, group=4) for t in range(4)]
    megabatch = pipeline.global_row_ids(100, 0, 32, seed=3)
    assert sorted(np.concatenate(batches).tolist()) == sorted(megabatch.tolist())  # each row once
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # cut from one sorted order
    np.testing.assert_array_equal(
        np.sort(preferences.grouped_batch_ids(lengths, 5, 8, 3, group=1)),
        np.sort(pipeline.global_row_ids(100, 5, 8, 3)),
    )  # group 1: the plain shuffle
    assert (
        preferences.batch_width(np.array([17, 3]), 96) == 32
        and preferences.batch_width(np.array([95]), 90) == 90
    )

    rng = np.random.default_rng(1)
    groups = [
        [[1] + rng.integers(3, 200, size=n).tolist() + [2] for n in rng.integers(4, 60, size=3)]
        for _ in range(10)
    ]
    c = preferences.build_comparisons(groups, [[0, 1, 2]] * 10, [3] * 10, seq_len=64, pad_id=0)
    model = RewardModel(CFG, likelihood_term=True)
    params = random_params(
        model, jnp.zeros((1, 64), jnp.int32), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    )
    loss_fn = jax.jit(lambda batch: reward.reward_loss(params, batch, None, model=model, margin=0.0)[0])
    loss = lambda batch: np.asarray(loss_fn(batch))  # noqa: E731
    trimmed = comparison_batches.eval_batches(c, batch_size=4, num_batches=0)
    assert [b["tokens"].shape[2] for b in trimmed] == [48, 64, 64]  # sorted: the shortest prompts first
    whole = c.take(np.arange(10))
    np.testing.assert_allclose(sum(loss(b) for b in trimmed), loss(whole), rtol=1e-5)


def test_rl_eval_prompts_avoid_the_sft_runs_own_eval_prompts():
    sft_data = {"source": "graded_tasks", "tasks": "add,reverse", "num_eval": 50, "task_seed": 0}
    seen = preferences.sft_heldout_prompts(sft_data)
    examples = preferences.rl_eval_prompts("add,reverse", 40, 0, sft_data)
    assert len(seen) == 50 and len(examples) == 40 and not seen & {e["prompt"] for e in examples}
    assert all(graded_tasks.split_of(e["prompt"]) == "validation" for e in examples)


def _hh_data(tmp_path, files, seq_len, skip=False):
    data_cfg = {
        "source": "hh",
        "files": files,
        "eval_fraction": 0.3,
        "data_dir": str(tmp_path / "data"),
        "skip_bad_records": skip,
    }
    return preferences.hh_comparisons(data_cfg, {}, ByteTokenizer(), seq_len, (0, 0))


def test_hh_triples_become_two_response_comparisons(tmp_path):
    turn = "\n\nHuman: Hi {0}\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant:"
    rows = [
        {"chosen": turn.format(i) + f" Good {i}.", "rejected": turn.format(i) + " Bad."} for i in range(12)
    ]
    rows += [
        {"chosen": turn.format(20) + " Fine.", "rejected": turn.format(21) + " Other dialogue."},  # mismatch
        {"chosen": turn.format(22) + " Fine.", "rejected": turn.format(22)},  # empty rejected
        {"chosen": turn.format(23), "rejected": turn.format(23) + " Bad."},
    ]  # empty chosen
    (tmp_path / "hh.jsonl").write_text("\n".join(map(json.dumps, rows)))
    data = _hh_data(tmp_path, str(tmp_path / "hh.jsonl"), seq_len=96)
    assert data.train.num_prompts + data.eval.num_prompts == 12 and data.eval.num_prompts > 0
    assert data.info["train"]["num_pairs"] == data.train.num_prompts and data.info["train"]["K"] == 2
    for split in (data.train, data.eval):
        assert split.ranks.tolist() == [[0, 1]] * split.num_prompts and split.mask.all()
        ends = np.take_along_axis(split.tokens, split.last_index[..., None], axis=2)[..., 0]
        assert (ends == ByteTokenizer.eos_id).all()
    text = [ByteTokenizer().decode(data.train.tokens[0, j, 1 : data.train.last_index[0, j]]) for j in (0, 1)]
    dialogue = r"User: \n\nHuman: Hi (\d+)\n\nAssistant: Hello\.\n\nHuman: And\?\n\nAssistant:\nAssistant: "
    assert re.fullmatch(dialogue + r"Good \1\.", text[0]) and re.fullmatch(dialogue + r"Bad\.", text[1]), text
    assert len(data.norm_tokens) == 12  # the chosen responses
    with pytest.raises(DataError, match=r"seq_len=60: preference triple .*hh\.jsonl:\d+ has \d+ tokens"):
        _hh_data(tmp_path, str(tmp_path / "hh.jsonl"), seq_len=60)


def test_hh_real_file_counts(tmp_path):
    if not os.path.exists(HH_FILE):
        pytest.skip(f"{HH_FILE} is absent")
    data = _hh_data(tmp_path, HH_FILE, seq_len=1024, skip=True)
    kept = data.train.num_prompts + data.eval.num_prompts
    skipped = data.info["train"]["num_skipped_too_long"] + data.info["eval"]["num_skipped_too_long"]
    assert kept + skipped == data.info["hh"]["num_preference_pairs"] == 2303 and kept > 1500


def run(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_reward_run_evaluates_keeps_best_and_normalises(smoke_chain):
    """The smoke chain's reward model (from the SFT run's step-40 checkpoint)."""
    workdir = pathlib.Path(smoke_chain["reward"])
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert all(0 <= r["eval_accuracy"] <= 1 and "eval_train_accuracy" in r for r in evals)
    assert {"loss", "accuracy"} <= set(records[1])
    norm = json.loads((workdir / saved_model.NORM_FILE).read_text())
    trained = [r for r in evals if r["step"] > 0]  # step 0 (the SFT likelihood) is never kept
    assert norm["best_step"] > 0 and norm["std"] > 0
    assert norm["best_eval_accuracy"] == max(r["eval_accuracy"] for r in trained)

    data = preferences.load(str(workdir / saved_model.COMPARISONS_FILE))
    assert data.train.tokens.shape[1:] == (4, 64) and data.info["label_noise"] == 0.0
    score_fn, tok, template = saved_model.load_reward_model(str(workdir))
    assert template == {"user": "User: ", "assistant": "\nAssistant: "} and tok.vocab_size == 259
    scores = np.asarray(score_fn(data.norm_tokens, data.norm_first_index, data.norm_last_index))
    assert len(scores) == norm["num_responses"] == 4 * (48 + 24)  # every sample, tied prompts' too
    assert abs(scores.mean()) < 1e-3 and abs(scores.std() - 1) < 1e-3


def test_bad_reward_config_is_one_line(tmp_path):
    result = run(
        "-m",
        "experiments.run",
        "--config=configs/reward/tasks_tiny.py:smoke",
        f"--workdir={tmp_path}",
        "--config.init_from=/nonexistent",
        "--config.reward.samples_per_prompt=1",
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "config.reward.samples_per_prompt=1" in errors[0], result.stderr
