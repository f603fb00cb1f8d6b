"""A run killed with SIGKILL and started again ends bit-identical to one that never stopped."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

STEPS = 160
ARGS = [
    "--config=configs/pretrain/gpt2.py:smoke",
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=20",
    "--config.train.eval_every=50",
    "--config.model.d_model=128",
    "--config.model.dropout=0.1",
    "--config.train.seq_len=64",
    "--config.train.global_batch_size=16",
    "--config.data.source=text_files",
]


def corpus(tmp_path) -> str:
    """A few hundred KB of real text: some standard-library modules."""
    stdlib = sysconfig.get_paths()["stdlib"]
    text = "".join(
        open(os.path.join(stdlib, name)).read() for name in ("argparse.py", "typing.py", "inspect.py")
    )
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return str(path)


def command(workdir, data) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.run",
        *ARGS,
        f"--config.data.files={data}",
        f"--workdir={workdir}",
    ]


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.endswith("\n")]


def final_params(workdir):
    """The parameters of the last checkpoint, as host arrays."""
    with ocp.PyTreeCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(workdir, "checkpoints", str(STEPS), "state"))
    return jax.device_get(state["params"])


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    data = corpus(tmp_path)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    proc = subprocess.Popen(command(resumed, data), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in logged_steps(resumed)]
        if steps and steps[-1] >= 80:  # past an eval (50); step 80 is logged just before its save
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = [r["step"] for r in logged_steps(resumed)][-1]
    assert killed_at < STEPS

    for workdir in (resumed, straight):
        done = subprocess.run(command(workdir, data), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    a, b = final_params(straight), final_params(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)
    ra, rb = logged_steps(straight), logged_steps(resumed)
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))  # no step missing or repeated
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r.get("eval_loss") for r in ra] == [r.get("eval_loss") for r in rb]
