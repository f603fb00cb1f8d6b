"""Bad input to the runner: one clear line on stderr, exit code 2, no traceback."""

import subprocess
import sys

import pytest

TINY = "configs/pretrain/tiny.py"


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def bad_input_cases(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    w = str(tmp_path / "w")
    return {
        "unknown key": (
            [f"--config={TINY}", f"--workdir={w}", "--config.train.no_such_key=1"],
            "no_such_key",
        ),
        "wrong type": ([f"--config={TINY}", f"--workdir={w}", "--config.train.steps=many"], "steps"),
        "missing config file": (["--config=configs/nope.py", f"--workdir={w}"], "nope.py"),
        "mesh does not fit": ([f"--config={TINY}", f"--workdir={w}", "--config.mesh.data=3"], "mesh"),
        "batch not divisible": (
            [
                f"--config={TINY}",
                f"--workdir={w}",
                "--config.mesh.data=8",
                "--config.train.global_batch_size=12",
            ],
            "global_batch_size",
        ),
        "seq longer than model": (
            [f"--config={TINY}", f"--workdir={w}", "--config.train.seq_len=4096"],
            "seq_len",
        ),
        "missing corpus": (
            [
                f"--config={TINY}",
                f"--workdir={w}",
                "--config.data.source=text_files",
                "--config.data.files=/nonexistent/*.txt",
            ],
            "/nonexistent/*.txt",
        ),
        "empty corpus": (
            [
                f"--config={TINY}",
                f"--workdir={w}",
                "--config.data.source=text_files",
                f"--config.data.files={empty}",
            ],
            "empty.txt",
        ),
        "unknown source": ([f"--config={TINY}", f"--workdir={w}", "--config.data.source=nowhere"], "source"),
        "unwritable workdir": ([f"--config={TINY}", f"--workdir={not_a_dir}/sub"], "workdir"),
        "url workdir": ([f"--config={TINY}", "--workdir=gs://bucket/run"], "gs://bucket/run"),
        "vocab not divisible": (
            [f"--config={TINY}:smoke", f"--workdir={w}", "--config.mesh.tensor=2"],
            "vocab_size=259",
        ),
    }


CASES = [
    "unknown key",
    "wrong type",
    "missing config file",
    "mesh does not fit",
    "batch not divisible",
    "seq longer than model",
    "missing corpus",
    "empty corpus",
    "unknown source",
    "unwritable workdir",
    "url workdir",
    "vocab not divisible",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path):
    args, must_name = bad_input_cases(tmp_path)[case]
    result = run_cli(*args)
    lines = [line for line in result.stderr.splitlines() + result.stdout.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and must_name in errors[0], lines
