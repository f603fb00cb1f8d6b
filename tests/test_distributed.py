"""Several real processes (`tools.launch_local`, gloo collectives) train like one process with the
same devices: equal losses step by step, and checkpoints one process restores."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lm import distributed, saved_model
from lm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"data": ["--config.mesh.data=-1"], "fsdp": ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]}


def run_command(workdir, mesh: str) -> list:
    return [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "configs/pretrain/tiny.py:smoke",
        "--workdir",
        str(workdir),
        "--config.train.steps=10",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=10",
        "--config.train.num_samples=0",
        "--config.model.vocab_size=264",
        *MESHES[mesh],
    ]  # 264: divisible by tensor=2 (bytes: 259)


def losses(workdir) -> list:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def run(cmd, env_devices: int | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if env_devices:
        flags.append(f"--xla_force_host_platform_device_count={env_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mesh", ["data", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_processes_equal_one(tmp_path, mesh):
    one = run(run_command(tmp_path / "one", mesh), env_devices=8)
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [
        sys.executable,
        "-m",
        "tools.launch_local",
        "--num_processes",
        "2",
        "--devices_per_process",
        "4",
        "--",
    ]
    two = run(launcher + run_command(tmp_path / "two", mesh), env_devices=None)
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]
    config = json.load(open(tmp_path / "two" / "config.json"))
    assert config["run"]["num_processes"] == 2
    a, b = np.array(losses(tmp_path / "one")), np.array(losses(tmp_path / "two"))
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(b, a, rtol=1e-5)
    # The 2-process checkpoint restores here, in one process, to the 1-process run's parameters
    # (atol for values near zero, e.g. biases of order 1e-7, where summation order shows).
    p1 = saved_model.load(str(tmp_path / "one"), "latest").params
    p2 = saved_model.load(str(tmp_path / "two"), "latest").params
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    if mesh == "fsdp":  # the whole train state resumes on another topology: 1 process, data=2 x tensor=2
        resumed = run(
            run_command(tmp_path / "two", mesh)[: -len(MESHES[mesh])]
            + ["--config.mesh.data=2", "--config.mesh.tensor=2", "--config.train.steps=12"],
            env_devices=4,
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resumed from step 10" in resumed.stdout
        after = losses(tmp_path / "two")
        assert len(after) == 12 and all(np.isfinite(after[10:]))


def test_partial_coordinator_flags_are_a_config_error(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="go together"):
        distributed.initialize("127.0.0.1:1234", None, None)
    with pytest.raises(ConfigError, match="process_id"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
        distributed.initialize()
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
    assert distributed.initialize() is False  # one process: nothing to join


@pytest.mark.slow
def test_sigterm_to_two_processes_saves_one_checkpoint_at_an_agreed_step(tmp_path):
    """SIGTERM to the launcher reaches both processes; they agree on the step (at a log step), both
    write their shards of one checkpoint, exit 75, and a relaunch finishes the run."""
    workdir = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "tools.launch_local",
        "--num_processes",
        "2",
        "--devices_per_process",
        "4",
        "--",
        *run_command(workdir, "data"),
    ]
    cmd = [a for a in cmd if not a.startswith(("--config.train.steps=", "--config.train.checkpoint_every="))]
    cmd += ["--config.train.steps=400", "--config.train.checkpoint_every=1000", "--config.train.log_every=5"]
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "metrics.jsonl").exists():
        time.sleep(1)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and steps[0] % 5 == 0 and 0 < steps[0] < 400, (steps, out[-2000:])
    cmd = [a for a in cmd if a != "--config.train.steps=400"] + [f"--config.train.steps={steps[0] + 5}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"resumed from step {steps[0]}" in done.stdout
