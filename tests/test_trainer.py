"""The one trainer core: the command line (--help, --print_config, keys a task does not read), the
user's config kept apart from what a run resolved, and every task honouring train.on_nonfinite and
train.inject_nan_at_step."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import ONE_DEVICE, run_module

from experiments import run as runner
from lm import checkpoint


def test_help_lists_the_flags_and_exits_zero():
    result = run_module("-m", "experiments.run", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m experiments.run --config")
    for flag in ("--config", "--workdir", "--print_config", "--member"):
        assert flag in result.stdout


def test_print_config_prints_json_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "never"
    argv = [
        "run",
        "--config=configs/pretrain/tiny.py",
        f"--workdir={workdir}",
        "--print_config",
        "--config.scaling.budget=1e12",
        "--config.model.vocab_size=512",
    ]
    assert runner.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "pretrain" and printed["model"]["num_layers"] == 4
    assert printed["train"]["steps"] == 150  # the user's value, not overwritten
    assert printed["resolved"]["train"]["steps"] not in (0, 150)  # what the budget makes of it
    assert not workdir.exists()


@pytest.mark.parametrize(
    "key",
    [
        "ppo.epochs=2",
        "dpo.beta=0.2",
        "sft.eval_prompts=10",
        "lora.rank=4",
        "train.length_group=2",
        "init_from=x",
    ],
)
def test_a_key_the_task_does_not_read_is_an_unknown_key(tmp_path, capsys, key):
    workdir = tmp_path / "w"
    assert (
        runner.main(["run", "--config=configs/pretrain/tiny.py", f"--workdir={workdir}", f"--config.{key}"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: unknown config key config.{key.split('=')[0]} "), err
    assert not workdir.exists()


def test_sft_config_json_keeps_the_users_model_and_records_the_adopted_one(smoke_chain):
    saved = json.loads(open(os.path.join(smoke_chain["sft"], "config.json")).read())
    assert saved["model"]["num_layers"] == 6 and saved["model"]["d_model"] == 384  # configs/sft: the defaults
    assert saved["resolved"]["model"]["num_layers"] == 2 and saved["resolved"]["model"]["d_model"] == 64
    assert "template" not in saved["resolved"]  # a pretraining run has none to adopt
    resolved = checkpoint.read_run_config(smoke_chain["sft"])
    assert resolved["model"]["num_layers"] == 2 and "resolved" not in resolved
    reward = json.loads(open(os.path.join(smoke_chain["reward"], "config.json")).read())
    assert (
        reward["resolved"]["template"] == saved["template"] and reward["resolved"]["model"]["d_model"] == 64
    )


def _stage_args(task: str, chain: dict) -> list[str]:
    sft_best = os.path.join(chain["sft"])
    return {
        "sft": ["--config=configs/sft/tasks_tiny.py:smoke", f"--config.init_from={chain['pretrain']}"],
        "reward": ["--config=configs/reward/tasks_tiny.py:smoke", f"--config.init_from={sft_best}"],
        "dpo": [
            "--config=configs/dpo/tasks_tiny.py:smoke",
            f"--config.init_from={sft_best}",
            f"--config.dpo.comparisons_from={chain['reward']}",
        ],
        "grpo": [
            "--config=configs/grpo/tasks_tiny.py:smoke",
            f"--config.init_from={sft_best}",
            f"--config.grpo.reward_from={chain['reward']}",
        ],
        "ppo": [
            "--config=configs/ppo/tasks_tiny.py:smoke",
            f"--config.init_from={sft_best}",
            f"--config.ppo.reward_from={chain['reward']}",
        ],
    }[task]


# The tasks on the core's own step (sft, reward, dpo) share the step pretraining's test covers
# (tests/test_reliability.py), so they run with -m slow; PPO and GRPO bring their own step.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "task", [pytest.param(t, marks=SLOW) for t in ("sft", "reward", "dpo")] + ["ppo", "grpo"]
)
def test_every_task_stops_at_a_nonfinite_step(smoke_chain, tmp_path, task):
    """train.inject_nan_at_step makes step 1's gradients NaN; under the default 'stop' policy every
    task ends with one error line at the next log step and exit 2, nothing saved past the bad step.
    (Pretraining: tests/test_reliability.py.)"""
    workdir = tmp_path / task
    result = run_module(
        "-m",
        "experiments.run",
        *_stage_args(task, smoke_chain),
        f"--workdir={workdir}",
        "--config.train.inject_nan_at_step=1",
        "--config.train.log_every=2",
        "--config.train.eval_every=0",
        "--config.train.steps=4",
        env=ONE_DEVICE,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "Traceback" not in result.stderr, result.stderr[
        -1500:
    ]
    saved = (
        [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
        if (workdir / "checkpoints").exists()
        else []
    )
    assert all(step <= 1 for step in saved), saved


def test_ppo_skips_a_nonfinite_iteration_and_goes_on(smoke_chain, tmp_path):
    """PPO's own step applies the core's policy: under 'skip' the NaN iteration changes no
    parameter, is counted once, and training goes on to the end with finite parameters."""
    workdir = tmp_path / "ppo"
    result = run_module(
        "-m",
        "experiments.run",
        *_stage_args("ppo", smoke_chain),
        f"--workdir={workdir}",
        "--config.train.inject_nan_at_step=1",
        "--config.train.on_nonfinite=skip",
        "--config.train.grad_accum=2",
        env=ONE_DEVICE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    skipped = {r["step"]: r["skipped_steps"] for r in records if "skipped_steps" in r}
    assert skipped[1] == 0 and skipped[2] == 1 and skipped[max(skipped)] == 1, skipped
    assert "skipped 1 step(s) with a non-finite loss or gradient norm" in result.stdout
    last = checkpoint.latest_step_in(str(workdir / "checkpoints"))
    saved = checkpoint.restore_meta(checkpoint.manager(str(workdir)), last)
    assert saved["config"]["train"]["grad_accum"] == 2
    # Trained on the reward model: the kept policy is a trained one, chosen by the reward model's
    # score on dev prompts, never by the grader (logged beside it).
    best_step = checkpoint.latest_step_in(str(workdir / "best"))
    best_meta = checkpoint.restore_meta(checkpoint.manager(str(workdir), keep=1, subdir="best"), best_step)
    assert best_step > 0 and set(best_meta) == {"eval_rm_score", "step"}
    assert all("eval_grader_score" in r for r in records if "eval_rm_score" in r)
    with ocp.PyTreeCheckpointer() as reader:
        state = reader.restore(str(workdir / "checkpoints" / str(last) / "state"))
    leaves = jax.tree.leaves(state["params"])
    assert len(leaves) > 10 and all(np.all(np.isfinite(np.asarray(leaf, np.float32))) for leaf in leaves)
