"""RLHF stages: PPO's on-policy consistency, DPO at initialisation, the report's statistics, and
the whole recipe end to end on smoke configs."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common as configs_common
from lm import evaluation, optim, rollouts, sampling, sharding
from lm.data import preferences
from lm.errors import ConfigError
from lm.heads import RewardModel
from lm.model import ModelConfig, Transformer
from lm.tasks import dpo, ppo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=61, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_seq_len=64)
EOS, PAD = 2, 0


def _params(module, *args, seed=0):
    return sharding.unboxed(module.init(jax.random.PRNGKey(seed), *args)["params"])


class _PPOSettings:
    """The config.ppo fields the PPO functions read."""

    max_new_tokens, temperature, reward, missing_eos_penalty = 12, 0.8, "rm", 1.0
    whiten_rewards, gamma, lam, clip, value_clip, vf_coef, entropy_coef = False, 1.0, 0.95, 0.2, 0.2, 0.1, 0.0


def test_ppo_first_minibatch_is_on_policy_and_kl_to_reference_is_zero():
    model, value_model, cfg = Transformer(CFG), RewardModel(CFG), _PPOSettings()
    tokens = jnp.zeros((1, 8), jnp.int32)
    policy = _params(model, tokens)
    rm = _params(value_model, tokens, jnp.zeros((1,), jnp.int32), seed=1)
    prompts, lengths = sampling.left_pad(
        [[1, 5, 9], [1, 7, 7, 3, 11, 4], [1, 30]], PAD, CFG, cfg.max_new_tokens
    )
    batch = {"prompts": jnp.asarray(prompts), "lengths": jnp.asarray(lengths), "index": jnp.arange(3)}
    params = {"policy": policy, "value": rm}
    frozen = {"reference": policy, "reward": rm, "norm": jnp.array([0.0, 1.0])}
    settings = sampling.SamplingSettings.create(cfg.temperature, 0, 1.0, EOS, PAD)
    data, stats = ppo.rollout(
        params,
        frozen,
        batch,
        jax.random.PRNGKey(2),
        jnp.float32(0.05),
        model=model,
        value_model=value_model,
        cfg=cfg,
        settings=settings,
        oracle=None,
    )
    assert float(stats["kl"]) == 0.0  # policy = reference
    _, on_policy = ppo.ppo_loss(
        params, data, model=model, value_model=value_model, cfg=cfg, prompt_width=prompts.shape[1]
    )
    assert abs(float(on_policy["ratio"]) - 1.0) < 1e-5
    assert abs(float(on_policy["approx_kl"])) < 1e-6 and float(on_policy["clip_fraction"]) == 0.0
    # The rollout's own log-probs are those the sampler drew from (within 1e-4, float32).
    _, sampled = sampling.sample_arrays(
        {"params": policy},
        batch["prompts"],
        batch["lengths"],
        jax.random.PRNGKey(2),
        settings,
        config=CFG,
        max_new_tokens=cfg.max_new_tokens,
    )
    np.testing.assert_allclose(np.asarray(data["logp"]) * np.asarray(data["mask"]), sampled, atol=1e-4)


def test_ppo_optimizer_steps_the_value_model_at_its_own_learning_rate():
    opt = ml_collections.ConfigDict(
        dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, decay_embeddings=False, clip_norm=1.0)
    )
    schedules = {"policy": optax.constant_schedule(1e-4), "value": optax.constant_schedule(1e-2)}
    tx = optim.per_model_optimizer(opt, schedules)
    params = {"policy": {"w": jnp.ones((3,))}, "value": {"w": jnp.ones((3,))}}
    grads = {"policy": {"w": jnp.array([5.0, -1.0, 0.5])}, "value": {"w": jnp.array([0.01, -3.0, 2.0])}}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step moves each weight by -lr * sign(grad), whatever the gradient's size or the
    # other model's (each model clips its own gradient norm).
    np.testing.assert_allclose(updates["policy"]["w"], -1e-4 * np.sign(grads["policy"]["w"]), rtol=1e-3)
    np.testing.assert_allclose(updates["value"]["w"], -1e-2 * np.sign(grads["value"]["w"]), rtol=1e-3)
    config = configs_common.ppo_config()
    config.init_from, config.data.source = "runs/sft", "graded_tasks"
    config.ppo.reward_from, config.ppo.value_lr = "runs/rm", -1e-4
    with pytest.raises(ConfigError, match=r"^config\.ppo\.value_lr=-0\.0001: expected >= 0"):
        ppo.validate(config)


def test_dpo_loss_at_initialisation_is_log_two():
    model = Transformer(CFG)
    params = _params(model, jnp.zeros((1, 8), jnp.int32))
    rng = np.random.default_rng(0)
    groups = [[[1, *rng.integers(3, 60, n), EOS] for n in (4, 7, 2)], [[1, 9, 9, EOS], [1, 8, EOS]]]
    c = preferences.build_comparisons(groups, [[0, 1, 2], [1, 0]], [1, 1], seq_len=12, pad_id=PAD)
    ref = dpo.reference_logprobs(model, params, c, rows=4)
    assert ref.shape == (2, 3) and np.all(ref[c.mask] < 0)
    batch = {**c.take(np.arange(2)), "ref_logp": ref.astype(np.float32)}
    loss_sum, aux = dpo.dpo_loss(params, batch, None, model=model, beta=0.1)
    assert abs(float(loss_sum / aux["weight"]) - math.log(2)) < 1e-6
    assert float(aux["accuracy"]) == 0.0  # all implicit rewards equal: no pair is right yet


def test_win_rate_counts_ties_as_half_and_brackets_its_interval():
    ours, sft = np.array([1.0, 0.5, 0.2, 0.7]), np.array([0.5, 0.5, 0.9, 0.1])
    result = evaluation.win_rate(ours, sft, num_bootstrap=2000)
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and result["tie_rate"] == 0.25
    lo, hi = result["win_rate_ci"]
    assert 0 <= lo <= result["win_rate"] <= hi <= 1
    same = evaluation.win_rate(sft, sft)
    assert same["win_rate"] == 0.5 and same["win_rate_ci"] == [0.5, 0.5] and same["tie_rate"] == 1.0
    assert evaluation.best_of_n_kl(1) == 0.0 and evaluation.best_of_n_kl(16) == pytest.approx(
        math.log(16) - 15 / 16
    )


@pytest.mark.slow
def test_recipe_runs_every_stage_skips_finished_ones_and_reports(tmp_path):
    """pretrain -> SFT -> reward -> PPO, DPO, best-of-n on smoke configs, then the report; a second
    run skips every stage and writes the same report."""
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=configs/recipe/instructgpt_tiny.py:smoke",
        f"--workdir={tmp_path}",
    ]
    env = {**os.environ, "LM_DATA_DIR": str(tmp_path / "data")}
    first = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["stages"]) == {
        "sft",
        "reward",
        "best_of_n",
        "ppo",
        "grpo",
        "dpo",
        "ppo_oracle",
        "grpo_oracle",
    }
    sft = report["stages"]["sft"]
    assert sft["win_rate_vs_sft"] == 0.5 and sft["tie_rate"] == 1.0 and abs(sft["kl_to_sft"]) < 1e-6
    assert 0.0 <= report["stages"]["reward"]["rm_accuracy"] <= 1.0
    for stage in ("ppo", "grpo", "dpo", "best_of_n", "ppo_oracle", "grpo_oracle"):
        row = report["stages"][stage]
        assert (
            0.0 <= row["oracle_score"] <= 1.0
            and row["win_rate_ci"][0] <= row["win_rate_vs_sft"] <= row["win_rate_ci"][1]
        )
        assert row["kl_to_sft"] >= -0.05, (stage, row)  # a Monte-Carlo KL estimate: non-negative up to noise
        assert set(row["oracle_score_by_task"]) == {"add", "reverse"}  # the recipe's smoke tasks
    assert report["stages"]["best_of_n"]["kl_to_sft"] == pytest.approx(math.log(4) - 3 / 4)
    ppo_metrics = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    first_step = next(r for r in ppo_metrics if r["step"] == 1)
    assert first_step["kl"] == 0.0 and {
        "rm_score",
        "oracle_score",
        "clip_fraction",
        "explained_variance",
        "value_loss",
        "entropy",
        "response_length",
    } <= set(first_step)
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("completed earlier, skipped") == 8, again.stdout[
        -2000:
    ]
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_best_of_n_picks_the_top_scored_candidate_in_any_batching():
    prompts = [[1, 5], [1, 6, 7], [1, 8]]
    candidates = [[[9], [9, 9, 9], [9, 9]], [[4, 4], [4], [4, 4, 4]], [[3], [3, 3, 3, 3], [3, 3]]]
    calls = []

    def longest_response(tokens, first_index, last_index):  # the score: response length
        calls.append(len(tokens))
        return np.asarray(last_index - first_index, np.float32)

    for batch in (2, 4, 256):
        assert evaluation.best_of_n(longest_response, prompts, candidates, pad_id=0, batch=batch) == [1, 2, 1]
    assert set(calls[:5]) == {2}  # 9 sequences in 5 calls of 2 rows


def test_recipe_passes_tasks_and_data_files_to_the_stages_that_take_them():
    from configs.recipe import instructgpt_hh, instructgpt_tiny
    from experiments import recipe

    graded = instructgpt_tiny.get_config("smoke")
    assert [recipe.stage_overrides(graded, s) for s in ("sft", "ppo")] == [
        ["--config.seed=0"],
        ["--config.seed=0", "--config.data.tasks=add,reverse"],
    ]
    hh = instructgpt_hh.get_config("smoke")
    hh.recipe.data_files, hh.seed = "a.jsonl,b.jsonl", 3
    overrides = {s: recipe.stage_overrides(hh, s) for s in recipe.STAGES}
    assert (
        overrides["sft"]
        == overrides["reward"]
        == overrides["ppo"]
        == ["--config.seed=3", "--config.data.files=a.jsonl,b.jsonl"]
    )
    assert overrides["pretrain"] == overrides["dpo"] == ["--config.seed=3"]


def _hh_file(path, num: int = 120):
    """A made-up HH file: arithmetic dialogues (a few with an earlier turn, too long for 64 byte
    positions: skipped and counted), chosen = the sum, rejected = a refusal."""
    rows = []
    for i in range(num):
        turn = f"\n\nHuman: What is {i} plus {i % 7}?\n\nAssistant:"
        if i % 10 == 9:
            turn = "\n\nHuman: Hi there, can you help me?\n\nAssistant: Sure.\n\nHuman: Add them." + turn
        rows.append({"chosen": f"{turn} {i + i % 7}.", "rejected": f"{turn} No."})
    path.write_text("\n".join(map(json.dumps, rows)))
    return str(path)


@pytest.mark.slow
def test_hh_recipe_runs_every_stage_and_reports_rm_scores(tmp_path):
    """pretrain -> SFT -> reward -> PPO, DPO, best-of-n on HH smoke configs and a made-up HH file,
    then the report: no oracle fields, reward-model scores and KL instead."""
    files = _hh_file(tmp_path / "hh.jsonl")
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=configs/recipe/instructgpt_hh.py:smoke",
        f"--workdir={tmp_path / 'recipe'}",
        f"--config.recipe.data_files={files}",
    ]
    env = {**os.environ, "LM_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((tmp_path / "recipe" / "report.json").read_text())
    assert (
        set(report["stages"])
        == {"sft", "reward", "best_of_n", "ppo", "grpo", "dpo", "ppo_oracle", "grpo_oracle"}
        and report["num_prompts"] > 0
    )
    assert 0.0 <= report["stages"]["reward"]["rm_accuracy"] <= 1.0
    sft = report["stages"]["sft"]
    assert (
        math.isfinite(sft["rm_score"])
        and math.isfinite(sft["rm_score_sampled"])
        and abs(sft["kl_to_sft"]) < 1e-6
    )
    for stage in ("sft", "ppo", "dpo", "best_of_n"):
        row = report["stages"][stage]
        assert all(
            row[f] is None
            for f in ("oracle_score", "oracle_score_sampled", "win_rate_vs_sft", "win_rate_ci", "tie_rate")
        ), (stage, row)
        assert math.isfinite(row["rm_score"]) and row["kl_to_sft"] >= -0.05, (stage, row)
    assert report["stages"]["best_of_n"]["kl_to_sft"] == pytest.approx(math.log(4) - 3 / 4)
    assert "oracle" not in (tmp_path / "recipe" / "report.md").read_text()
    ppo_records = [
        json.loads(line) for line in (tmp_path / "recipe" / "ppo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert not any("oracle_score" in r for r in ppo_records)
    assert [r["step"] for r in ppo_records if "eval_rm_score" in r] == [0, 2, 4]
    ppo_run = json.loads((tmp_path / "recipe" / "ppo" / "config.json").read_text())["run"]
    assert ppo_run["num_skipped_too_long"]["train"] > 0  # the dialogues with an earlier turn
    dpo_records = [
        json.loads(line) for line in (tmp_path / "recipe" / "dpo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("eval_accuracy" in r for r in dpo_records) and not any(
        "eval_grader_score" in r for r in dpo_records
    )


def test_hh_recipe_without_data_files_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/recipe/instructgpt_hh.py:smoke",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "config.recipe.data_files" in errors[0], result.stderr
    assert not (tmp_path / "pretrain").exists()  # nothing ran


HH_FILE = os.path.join(ROOT, "..", "shared", "data", "hh_rlhf_harmless_base_test.jsonl")


def test_ppo_hh_prompts_of_the_real_file(tmp_path):
    """PPO's HH prompts: distinct dialogue heads of each split, those too long skipped and counted."""
    if not os.path.exists(HH_FILE):
        pytest.skip(f"{HH_FILE} is absent")
    from configs.ppo import hh as ppo_hh
    from lm.data import sft as sft_data
    from lm.data.tokenizer import ByteTokenizer

    config = ppo_hh.get_config()
    config.data.files, config.data.data_dir = HH_FILE, str(tmp_path / "data")
    config.template.user, config.template.assistant = "", " "
    train, held_out, info = rollouts.prompt_examples(
        config,
        ByteTokenizer(),
        {},
        max_seq_len=256,
        eval_prompts=config.ppo.eval_prompts,
        max_new_tokens=config.ppo.max_new_tokens,
    )
    every = {split: preferences.hh_prompts(config.data, split) for split in ("train", "validation")}
    assert len(train) + info["num_skipped_too_long"]["train"] == len(every["train"]) > 1500
    fitting = len(every["validation"]) - info["num_skipped_too_long"]["validation"]
    assert len(held_out) == min(config.ppo.eval_prompts, fitting) > 0
    assert not set(every["train"]) & set(every["validation"])
    limit = config.train.seq_len - config.ppo.max_new_tokens
    for e in train + held_out:
        assert e["prompt"].endswith("\n\nAssistant:") and e["prompt"].startswith("\n\nHuman:")
        assert len(sft_data.encode_prompt(ByteTokenizer(), config.template, e["prompt"])) <= limit


def test_grpo_first_minibatch_is_on_policy():
    """A GRPO rollout's first update sees ratio 1 and no clipping, its KL to an identical reference
    is 0, and each prompt's group of responses is contiguous."""
    from lm.tasks import grpo

    model, reward_model = Transformer(CFG), RewardModel(CFG)
    tokens = jnp.zeros((1, 8), jnp.int32)
    policy = _params(model, tokens)
    rm = _params(reward_model, tokens, jnp.zeros((1,), jnp.int32), seed=1)
    prompts, lengths = sampling.left_pad([[1, 5, 9], [1, 7, 7, 3, 11, 4]], PAD, CFG, 12)
    batch = {"prompts": jnp.asarray(prompts), "lengths": jnp.asarray(lengths), "index": jnp.arange(2)}
    frozen = {"reference": policy, "reward": rm, "norm": jnp.array([0.0, 1.0])}
    cfg = ml_collections.ConfigDict(
        dict(
            group_size=4,
            max_new_tokens=12,
            temperature=1.0,
            reward="rm",
            missing_eos_penalty=1.0,
            kl_coef=0.05,
            kl_estimator="k3",
            std_normalise=True,
            clip=0.2,
            loss_norm="token",
        )
    )
    settings = sampling.SamplingSettings.create(1.0, 0, 1.0, EOS, PAD)
    data, stats = grpo.rollout(
        policy,
        frozen,
        batch,
        jax.random.PRNGKey(3),
        model=model,
        reward_model=reward_model,
        cfg=cfg,
        settings=settings,
        oracle=None,
    )
    assert data["tokens"].shape[0] == 8 and float(stats["kl"]) == 0.0
    np.testing.assert_array_equal(
        np.asarray(data["tokens"][:4, : prompts.shape[1]]), np.repeat(prompts[:1], 4, axis=0)
    )
    _, on_policy = grpo.grpo_loss(policy, data, None, model=model, cfg=cfg, prompt_width=prompts.shape[1])
    assert abs(float(on_policy["ratio"]) - 1.0) < 1e-5 and float(on_policy["clip_fraction"]) == 0.0
    assert np.allclose(np.asarray(data["advantages"]).reshape(2, 4).mean(axis=1), 0.0, atol=1e-5)


def test_report_test_prompts_are_disjoint_from_every_prompt_a_stage_chose_on(tmp_path):
    """SFT's eval prompts, the reward model's comparisons, each RL stage's dev prompts and the
    report's test prompts: disjoint, asserted on the prompts themselves."""
    from experiments import recipe
    from lm.data import preferences

    tasks = "add,reverse,constrained_line"
    sft_data = {
        "source": "graded_tasks",
        "tasks": "sort,add,reverse,constrained_line",
        "num_eval": 400,
        "task_seed": 0,
    }
    stages = {
        "reward": {
            "task": "reward",
            "data": {"tasks": tasks, "task_seed": 1},
            "reward": {"num_prompts": 300, "num_eval_prompts": 100},
        },
        "ppo": {"task": "ppo", "data": {"tasks": tasks, "task_seed": 0}, "ppo": {"eval_prompts": 200}},
        "dpo": {"task": "dpo", "data": {"tasks": tasks, "task_seed": 2}, "dpo": {"eval_prompts": 200}},
    }
    for stage, saved in stages.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.json").write_text(json.dumps(saved))
    config = ml_collections.ConfigDict({"recipe": {"tasks": tasks, "eval_prompts": 1000}})
    sft_config = ml_collections.ConfigDict({"data": sft_data})
    test = {e["prompt"] for e in recipe.graded_report_prompts(config, sft_config, str(tmp_path))}
    sets = {
        "sft": preferences.sft_heldout_prompts(sft_data),
        "reward": {
            e["prompt"]
            for e in preferences.held_out_prompts(tasks, 400, 1, preferences.sft_heldout_prompts(sft_data))
        },
        "ppo": {e["prompt"] for e in preferences.rl_eval_prompts(tasks, 200, 0, sft_data)},
        "dpo": {e["prompt"] for e in preferences.rl_eval_prompts(tasks, 200, 2, sft_data)},
    }
    assert len(test) == 1000
    for name, prompts in sets.items():
        assert prompts and not test & prompts, name
    assert not sets["sft"] & (sets["reward"] | sets["ppo"] | sets["dpo"])


def test_rl_stages_on_the_reward_model_keep_their_checkpoint_without_the_grader():
    """held_out_eval: PPO and GRPO trained on the reward model choose by eval_rm_score (the grader
    is logged beside it, never chosen on); trained on the grader, by eval_grader_score."""
    from lm.data import graded_tasks
    from lm.data.tokenizer import ByteTokenizer

    model, reward_model = Transformer(CFG), RewardModel(CFG)
    tokens = jnp.zeros((1, 8), jnp.int32)
    policy = _params(model, tokens)
    rm = _params(reward_model, tokens, jnp.zeros((1,), jnp.int32), seed=1)
    examples = graded_tasks.make_examples("add", 3, 0, "validation")
    for reward, chosen in (("rm", "eval_rm_score"), ("oracle", "eval_grader_score")):
        config = configs_common.grpo_config()
        config.grpo.reward, config.grpo.max_new_tokens = reward, 4
        saved = type("Saved", (), {"params": policy, "model_cfg": CFG, "tokenizer": ByteTokenizer()})
        setting = rollouts.Setting(
            config,
            {},
            saved,
            model,
            reward_model,
            rm,
            {"mean": 0.0, "std": 1.0},
            [],
            examples,
            {},
            {},
            None,
            None,
        )
        evaluate, metric = rollouts.held_out_eval(setting, {"reward": rm})
        record = evaluate(policy)
        assert metric == chosen and {"eval_rm_score", "eval_grader_score"} <= set(record)
