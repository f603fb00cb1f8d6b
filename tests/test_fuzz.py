"""Hostile input, generated: malformed configs and data files through the runner's in-process entry
point `experiments.run.main(argv)`. Each must end with exit code 2, one `error:` line and no
traceback, and leave the workdir as it was. A bug in the code is the opposite: exit code 1 and
its traceback. (tests/test_cli.py runs a fixed set of the same kinds as real subprocesses.)"""

import contextlib
import hashlib
import io
import os
import pathlib
import string
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments import run

TINY = "configs/pretrain/tiny.py:smoke"  # seconds to train, should a bad value ever get through
POSITIVE_KEYS = [
    "train.steps",
    "train.global_batch_size",
    "train.seq_len",
    "train.grad_accum",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
]
INT_KEYS = POSITIVE_KEYS + ["model.num_layers", "model.d_model", "seed"]
ENUM_KEYS = [
    "task",
    "model.positions",
    "model.norm",
    "model.mlp",
    "model.remat",
    "model.attention",
    "train.on_nonfinite",
    "precision.compute_dtype",
    "scaling.flops",
    "data.source",
    "lora.quantize",
]
SECTIONS = ["", "train.", "model.", "data.", "optimizer.", "nosuchsection."]
identifier = st.text(string.ascii_lowercase + "_", min_size=3, max_size=12)


def case(kind, args, names):
    return kind, list(args), names


@st.composite
def bad_configs(draw):
    """(failure kind, --config.* overrides, a string the error line must contain)."""
    kind = draw(
        st.sampled_from(
            [
                "not positive",
                "not an int",
                "bad enum",
                "unknown key",
                "seq > max_seq_len",
                "warmup outside [0, 1)",
                "batch % grad_accum",
                "negative budget",
                "heads do not divide width",
                "missing config file",
                "init_from missing",
                "vocab smaller than the tokenizer's",
            ]
        )
    )
    if kind == "not positive":
        key = draw(st.sampled_from(POSITIVE_KEYS))
        return case(kind, [f"--config.{key}={draw(st.integers(-(10**6), 0))}"], key)
    if kind == "not an int":
        key = draw(st.sampled_from(INT_KEYS))
        junk = draw(
            st.text(string.ascii_letters + ".-+", min_size=1, max_size=8).filter(
                lambda s: not s.lstrip("+-").isdigit()
            )
        )
        return case(kind, [f"--config.{key}={junk}"], key)
    if kind == "bad enum":
        key = draw(st.sampled_from(ENUM_KEYS))
        return case(kind, [f"--config.{key}=zz{draw(identifier)}"], key)
    if kind == "unknown key":
        key = draw(st.sampled_from(SECTIONS)) + "no_" + draw(identifier)
        return case(kind, [f"--config.{key}=1"], key)
    if kind == "seq > max_seq_len":
        return case(kind, [f"--config.train.seq_len={draw(st.integers(65, 10**5))}"], "seq_len")
    if kind == "warmup outside [0, 1)":
        value = draw(st.one_of(st.floats(1.0, 1e6), st.floats(-1e6, -1e-6)))
        return case(kind, [f"--config.schedule.warmup_fraction={value!r}"], "warmup_fraction")
    if kind == "batch % grad_accum":
        accum = draw(st.integers(3, 31).filter(lambda a: 8 % a))  # the smoke batch is 8
        return case(kind, [f"--config.train.grad_accum={accum}"], "grad_accum")
    if kind == "negative budget":
        return case(kind, [f"--config.scaling.budget={-draw(st.floats(1.0, 1e20))!r}"], "budget")
    if kind == "heads do not divide width":
        heads = draw(st.sampled_from([3, 5, 7, 9, 11]))
        return case(kind, [f"--config.model.num_heads={heads}"], "num_heads")
    if kind == "vocab smaller than the tokenizer's":  # the smoke tokenizer has 259 byte ids
        return case(kind, [f"--config.model.vocab_size={draw(st.integers(1, 258))}"], "vocab_size")
    if kind == "missing config file":
        return case(kind, [f"--config=configs/{draw(identifier)}.py"], ".py")
    return case(
        kind,
        ["--config=configs/sft/tasks_tiny.py", f"--config.init_from=/nonexistent/{draw(identifier)}"],
        "init_from",
    )


@st.composite
def bad_data_files(draw):
    """(failure kind, bytes of a text_files corpus, a string the error line must contain)."""
    kind = draw(st.sampled_from(["empty", "whitespace only", "not UTF-8", "binary"]))
    if kind == "empty":
        return kind, b"", "is empty"
    if kind == "whitespace only":
        return kind, draw(st.text(" \t\n\r", max_size=200)).encode(), "is empty"
    good = draw(st.text(string.ascii_letters + " \n", min_size=0, max_size=300)).encode()
    if kind == "not UTF-8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe9t\xe9", b"\xa0\xa1", b"\xf0\x28\x8c\x28"]))
        return kind, good + bad + good, "not valid UTF-8"
    return kind, good + b"\x00" + draw(st.binary(min_size=1, max_size=200)) + b"\xff\xfe", "not valid UTF-8"


def tree_hash(path) -> str:
    """A hash of every file's relative path and bytes under `path`."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def prepared_workdir(tmp_path) -> str:
    """A new workdir holding something to damage: a results file and a nested directory."""
    workdir = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
    (workdir / "keep").mkdir()
    (workdir / "results.csv").write_text("name,loss\nbaseline,3.1\n")
    (workdir / "keep" / "notes.txt").write_text("do not touch")
    return str(workdir)


def run_in_process(argv) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = run.main(["experiments.run", *argv])
    return code, err.getvalue()


def assert_one_clean_error(code, stderr, must_name, kind):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, (kind, code, stderr[-1500:])
    assert "Traceback" not in stderr, (kind, stderr[-1500:])
    assert len(errors) == 1 and must_name in errors[0], (kind, must_name, errors)


KINDS_SEEN = set()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_configs())
def test_malformed_configs_exit_2_with_one_line(tmp_path, bad):
    kind, overrides, must_name = bad
    config = [a for a in overrides if a.startswith("--config=")] or [f"--config={TINY}"]
    rest = [a for a in overrides if not a.startswith("--config=")]
    workdir = prepared_workdir(tmp_path)
    before = tree_hash(workdir)
    code, stderr = run_in_process([*config, f"--workdir={workdir}", *rest])
    assert_one_clean_error(code, stderr, must_name, kind)
    assert tree_hash(workdir) == before, kind
    KINDS_SEEN.add(kind)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=bad_data_files())
def test_malformed_data_files_exit_2_with_one_line(tmp_path, bad):
    kind, content, must_name = bad
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    workdir = prepared_workdir(tmp_path)
    before = tree_hash(workdir)
    code, stderr = run_in_process(
        [
            f"--config={TINY}",
            f"--workdir={workdir}",
            "--config.data.source=text_files",
            f"--config.data.files={corpus}",
        ]
    )
    assert_one_clean_error(code, stderr, must_name, kind)
    assert "corpus.txt" in stderr
    assert tree_hash(workdir) == before, kind
    KINDS_SEEN.add("data: " + kind)


def test_fuzzing_covered_every_failure_kind():
    """Runs after the two above (file order): 12 config kinds + 4 data kinds = 16 distinct kinds."""
    if len(KINDS_SEEN) < 2:
        pytest.skip("runs after the fuzz tests in the same session")
    assert len(KINDS_SEEN) >= 15, sorted(KINDS_SEEN)


def test_a_bug_in_the_code_exits_1_with_its_traceback(tmp_path):
    """No blanket catch: an internal error (here a ZeroDivisionError planted in the task) is not
    turned into a one-line user error."""
    planted = (
        "import sys; from experiments import run; from lm.tasks import pretrain\n"
        "def broken(config, workdir):\n    return 1 / 0\n"
        "pretrain.run = broken\n"
        "sys.exit(run.main(sys.argv))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", planted, f"--config={TINY}", f"--workdir={tmp_path / 'w'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ZeroDivisionError" in done.stderr
    assert not any(line.startswith("error:") for line in done.stderr.splitlines())
