"""Test setup: 8 simulated CPU devices, so sharding runs on real multi-device meshes; a data
directory private to the test session (LM_DATA_DIR, unless the caller sets one to reuse)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LM_DATA_DIR", tempfile.mkdtemp(prefix="lm-test-data-"))

import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs whose sharding is not under test: one device compiles faster.
ONE_DEVICE = {
    **os.environ,
    "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")),
}


def run_module(*args, env=None, timeout=600):
    """`python -m experiments.run ...` (or any module) from the project root, output captured."""
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory):
    """Workdirs of the smoke pretrain -> SFT (40 steps, enough for some answers to earn partial
    credit) -> reward model chain, on one device: {'pretrain', 'sft', 'reward'} paths."""
    dirs = {stage: tmp_path_factory.mktemp(stage) for stage in ("pretrain", "sft", "reward")}
    commands = {
        "pretrain": ["--config=configs/pretrain/tiny.py:smoke"],
        "sft": [
            "--config=configs/sft/tasks_tiny.py:smoke",
            f"--config.init_from={dirs['pretrain']}",
            "--config.optimizer.lr=3e-3",
            "--config.train.steps=40",
            "--config.train.eval_every=40",
            "--config.train.checkpoint_every=40",
        ],
        "reward": [
            "--config=configs/reward/tasks_tiny.py:smoke",
            f"--config.init_from={dirs['sft'] / 'checkpoints' / '40'}",
        ],
    }
    for stage, args in commands.items():
        result = run_module("-m", "experiments.run", *args, f"--workdir={dirs[stage]}", env=ONE_DEVICE)
        assert result.returncode == 0, (stage, result.stderr[-2000:])
    return {stage: str(path) for stage, path in dirs.items()}
