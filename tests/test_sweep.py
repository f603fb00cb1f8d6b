"""Sweeps: declared members, a failing member that stops nobody, skip-on-rerun, submitit, IsoFLOP sizing."""

import csv
import json
import os
import subprocess
import sys

import pytest

from configs import common
from configs.scaling import isoflop_tiny
from experiments import sweep
from lm import flops
from lm.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_CONFIG = """
from configs import common
from configs.pretrain import tiny


def get_config(arg=None):
    c = tiny.get_config('smoke')
    c.train.steps = 4
    c.train.checkpoint_every = 2
    c.train.num_samples = 0
    return c


def get_sweep(arg=None):
    good = common.sweep('optimizer.lr', [1e-3, 3e-3])
    broken = [{'data.source': 'nowhere'}]  # raises at run time, not at validation
    return good + broken
"""


def run_sweep(config_path, workdir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--config={config_path}", f"--workdir={workdir}", *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def read_results(workdir):
    with open(os.path.join(workdir, "results.csv")) as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_helpers_expand_products_and_zips():
    members = common.product(
        common.sweep("a", [1, 2]), common.zipped(common.sweep("b", [3, 4]), common.sweep("c", [5, 6]))
    )
    assert members == [
        {"a": 1, "b": 3, "c": 5},
        {"a": 1, "b": 4, "c": 6},
        {"a": 2, "b": 3, "c": 5},
        {"a": 2, "b": 4, "c": 6},
    ]
    assert sweep.member_name({"scaling.budget": 3e12, "model.d_model": 64}) == "budget=3e12,d_model=64"
    with pytest.raises(ValueError):
        common.zipped(common.sweep("a", [1]), common.sweep("b", [1, 2]))


def test_failing_member_is_recorded_and_rerun_skips_completed(tmp_path):
    config = tmp_path / "sweep_config.py"
    config.write_text(SWEEP_CONFIG)
    workdir = tmp_path / "sweep"
    first = run_sweep(config, workdir, "--parallel=2")
    assert first.returncode == 1, first.stderr[-3000:]  # not every member completed
    rows = read_results(workdir)
    assert {n: r["status"] for n, r in rows.items()} == {
        "lr=0.001": "completed",
        "lr=0.003": "completed",
        "source=nowhere": "failed",
    }
    header = next(csv.reader(open(workdir / "results.csv")))
    assert header == sweep.RESULT_COLUMNS + ["optimizer.lr", "data.source"]
    for name in ("lr=0.001", "lr=0.003"):
        row = rows[name]
        assert int(row["D"]) == 4 * 8 * 64 and int(row["N"]) > int(row["N_nonembedding"]) > 0
        assert 0 < float(row["eval_loss"]) < 6.0 and float(row["train_loss"]) > 0
        assert float(row["C"]) == pytest.approx(
            int(row["D"])
            * flops.flops_per_token(
                ModelConfig(vocab_size=259, num_layers=2, num_heads=4, d_model=64, d_ff=256, max_seq_len=64),
                64,
                "chinchilla",
            )
        )
    failed = json.loads((workdir / "source=nowhere" / "status.json").read_text())
    assert failed["returncode"] == 2 and "source" in failed["error"]

    second = run_sweep(config, workdir)
    assert second.returncode == 1
    assert "3 members, 2 completed, 1 to run" in second.stdout
    for name, attempts in (("lr=0.001", 1), ("lr=0.003", 1), ("source=nowhere", 2)):
        assert json.loads((workdir / name / "status.json").read_text())["attempts"] == attempts
    assert read_results(workdir)["lr=0.001"]["eval_loss"] == rows["lr=0.001"]["eval_loss"]


def test_submitit_local_launcher_runs_members(tmp_path):
    pytest.importorskip("submitit")
    workdir = tmp_path / "sweep"
    result = run_sweep(
        "configs/scaling/isoflop_tiny.py:smoke",
        workdir,
        "--launcher=submitit-local",
        "--parallel=2",
        "--config.train.eval_batches=2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_results(workdir)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows.values())
    assert all(float(r["eval_loss"]) > 0 for r in rows.values())


def test_bad_sweep_member_key_stops_before_running(tmp_path):
    config = tmp_path / "bad_sweep.py"
    config.write_text(SWEEP_CONFIG.replace("'data.source'", "'data.no_such_key'"))
    result = run_sweep(config, tmp_path / "sweep")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: sweep member no_such_key=nowhere: unknown config key config.data.no_such_key"
    ]
    assert not (tmp_path / "sweep").exists()  # nothing written, not even the sweep's directory


def test_isoflop_members_spend_their_budget():
    """Each member's steps come from its budget; the realised C is within half a step of it."""
    members = isoflop_tiny.get_sweep()
    budgets = sorted({m["scaling.budget"] for m in members})
    assert len(members) >= 15 and len(budgets) >= 3 and budgets[-1] / budgets[0] >= 10
    base = isoflop_tiny.get_config()
    tokens_per_step = base.train.global_batch_size * base.train.seq_len
    for m in members:
        cfg = ModelConfig(
            vocab_size=base.tokenizer.vocab_size,
            num_layers=m["model.num_layers"],
            num_heads=m["model.num_heads"],
            d_model=m["model.d_model"],
            d_ff=m["model.d_ff"],
            max_seq_len=base.model.max_seq_len,
        )
        steps = flops.steps_for_budget(
            cfg, base.train.seq_len, tokens_per_step, m["scaling.budget"], base.scaling.flops
        )
        per_step = flops.flops_per_token(cfg, base.train.seq_len, "chinchilla") * tokens_per_step
        assert abs(steps * per_step - m["scaling.budget"]) <= per_step / 2
        assert steps >= 100  # enough steps for warmup and a cosine decay to mean something
