"""Preemption and damaged checkpoints: SIGTERM saves and exits 75, an unreadable newest checkpoint
falls back to the one before; either way the run ends bit-identical to one that never stopped."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lm import checkpoint
from lm.errors import CheckpointError
from lm.loop import PreemptionFlag
from lm.metrics import read_jsonl

STEPS = 30
ARGS = [
    "--config=configs/pretrain/tiny.py:smoke",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.num_samples=0",
]


def command(workdir, *overrides) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *ARGS, *overrides, f"--workdir={workdir}"]


def run_to_end(cmd) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged(workdir) -> list[dict]:
    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def checkpoint_steps(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def params_at(workdir, step):
    """The parameters saved at `step`, as host arrays."""
    with ocp.PyTreeCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.device_get(state["params"])


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(x, y)


def truncate_largest_file(directory):
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> str:
    """The workdir of an uninterrupted run, checkpointed at steps 20 and 30 (keep 2)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    run_to_end(command(workdir, "--config.train.checkpoint_every=10"))
    assert checkpoint_steps(workdir) == [20, STEPS]
    return workdir


def test_sigterm_saves_exits_75_and_resumes_bit_identical(straight, tmp_path):
    workdir = str(tmp_path / "preempted")
    cmd = command(workdir, f"--config.train.checkpoint_every={STEPS + 1}")  # only SIGTERM saves mid-run
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full pipe would stall the run
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(logged(workdir)) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be preempted"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 75, err[-3000:]
    assert "preempted at step" in err.strip().splitlines()[-1]
    (saved,) = checkpoint_steps(workdir)
    assert 0 < saved < STEPS
    assert [r["step"] for r in logged(workdir)] == list(range(1, saved + 1))  # log_every=1: each step

    done = run_to_end(cmd)
    assert f"resumed from step {saved}" in done.stdout
    assert_same_params(params_at(straight, STEPS), params_at(workdir, STEPS))
    assert [r["loss"] for r in logged(workdir)] == [r["loss"] for r in logged(straight)]


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back_to_previous(straight, tmp_path):
    workdir = str(tmp_path / "damaged")
    shutil.copytree(straight, workdir)
    truncate_largest_file(os.path.join(workdir, "checkpoints", str(STEPS), "state"))

    done = run_to_end(command(workdir, "--config.train.checkpoint_every=10"))
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1, done.stderr[-3000:]
    assert f"checkpoint {STEPS} in" in warnings[0] and "resuming from step 20" in warnings[0]
    assert "resumed from step 20" in done.stdout
    kept = os.listdir(os.path.join(workdir, "checkpoints"))
    assert any(name.startswith(f"{STEPS}.unreadable") for name in kept), kept  # moved aside, not deleted
    assert_same_params(params_at(straight, STEPS), params_at(workdir, STEPS))
    assert [r["loss"] for r in logged(workdir)] == [r["loss"] for r in logged(straight)]


def test_no_readable_checkpoint_is_one_checkpoint_error(tmp_path):
    mngr = checkpoint.manager(str(tmp_path))
    state = {"w": np.arange(4.0, dtype=np.float32)}
    for step in (1, 2):
        checkpoint.save(mngr, step, state, {})
        truncate_largest_file(os.path.join(str(tmp_path), "checkpoints", str(step), "state"))
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (4,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
    }
    with pytest.raises(CheckpointError, match="no readable checkpoint") as e:
        checkpoint.restore(mngr, abstract)
    assert "\n" not in str(e.value)
    assert checkpoint_steps(str(tmp_path)) == [1, 2]  # nothing deleted when nothing could be used


def test_preemption_flag_catches_sigterm_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionFlag(sync_every=10) as preemption:
        assert not preemption.stop_at(1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert preemption.stop_at(2)
    assert signal.getsignal(signal.SIGTERM) is previous


def test_nonfinite_step_skipped_under_skip_policy(tmp_path):
    workdir = str(tmp_path / "skip")
    done = run_to_end(
        command(
            workdir,
            "--config.train.steps=8",
            "--config.train.inject_nan_at_step=4",
            "--config.train.on_nonfinite=skip",
            "--config.train.checkpoint_every=4",
        )
    )
    records = logged(workdir)
    assert [r["skipped_steps"] for r in records if r["step"] in (4, 5, 8)] == [0, 1, 1]
    assert [r["grad_norm"] for r in records if r["step"] == 5] == ["nan"]  # step index 4 is the 5th
    assert "skipped 1 step(s) with a non-finite loss or gradient norm" in done.stdout
    for leaf in jax.tree.leaves(params_at(workdir, 8)):
        assert np.all(np.isfinite(leaf))


def test_nonfinite_step_stops_under_stop_policy_keeping_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "stop")
    done = subprocess.run(
        command(
            workdir,
            "--config.train.steps=12",
            "--config.train.inject_nan_at_step=4",
            "--config.train.checkpoint_every=3",
            "--config.train.log_every=4",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "non-finite" in error[0] and "step 3 is kept" in error[0], done.stderr[-1000:]
    assert checkpoint_steps(workdir) == [3]  # the step-6 save came after the bad step: refused
    for leaf in jax.tree.leaves(params_at(workdir, 3)):
        assert np.all(np.isfinite(leaf))


def test_checkpoint_of_another_model_size_is_one_line_naming_the_parameter(straight, tmp_path):
    workdir = str(tmp_path / "resized")
    shutil.copytree(straight, workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    done = subprocess.run(
        command(workdir, "--config.model.d_ff=128"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, done.stderr[-1000:]
    assert "does not fit this config" in error[0] and "params/layers_0/mlp/wi" in error[0], error[0]
    assert "(256,) in the checkpoint, (128,) in this config" in error[0], error[0]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved aside
