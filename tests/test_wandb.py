"""Weights & Biases beside metrics.jsonl (config.logging.wandb_project), checked offline: the run's
.wandb file is read back and compared with metrics.jsonl and config.json."""

import glob
import json
import os
import struct

import pytest
from conftest import ONE_DEVICE, run_module

from lm import metrics
from lm.errors import ConfigError

SMOKE = ["-m", "experiments.run", "--config=configs/pretrain/tiny.py:smoke"]


def read_wandb_records(path: str) -> list:
    """The protobuf Records of a .wandb file: a 7-byte header, then LevelDB-log style chunks in
    32 KiB blocks (crc32 4, length 2, type 1: full 1, first 2, middle 3, last 4)."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunk, out = open(path, "rb").read(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and n == 0:
            pos += left
            continue
        chunk += raw[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def offline_run(wandb_dir: str, run_id: str) -> tuple[dict, dict]:
    """({step: history row}, run config) of every offline run dir of `run_id` under `wandb_dir`."""
    history, config = {}, {}
    for path in sorted(glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}", "*.wandb"))):
        for r in read_wandb_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                history[r.history.step.num] = _items(r.history.item)
            elif kind == "run":
                config.update(_items(r.run.config.update))
            elif kind == "config":
                config.update(_items(r.config.update))
    config.pop("_wandb", None)
    return history, config


def test_offline_run_holds_metrics_and_config_and_resumes(tmp_path):
    pytest.importorskip("wandb")
    workdir, wandb_dir = tmp_path / "run", str(tmp_path / "wandb_files")
    env = {**ONE_DEVICE, "WANDB_MODE": "offline", "WANDB_DIR": wandb_dir, "WANDB_SILENT": "true"}
    args = [*SMOKE, "--config.logging.wandb_project=test", f"--workdir={workdir}"]
    result = run_module(*args, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = (workdir / metrics.WANDB_ID_FILE).read_text().strip()

    result = run_module(*args, "--config.train.steps=8", env=env)  # resumes at 6, same W&B run
    assert result.returncode == 0, result.stderr[-2000:]
    assert (workdir / metrics.WANDB_ID_FILE).read_text().strip() == run_id
    assert len(glob.glob(os.path.join(wandb_dir, "wandb", f"offline-run-*-{run_id}"))) == 2

    history, config = offline_run(wandb_dir, run_id)
    records = metrics.read_jsonl(str(workdir / "metrics.jsonl"))
    assert [r["step"] for r in records] == sorted(history) == [1, 2, 4, 6, 8]
    for r in records:
        for key, value in r.items() - {("step", r["step"])}:
            assert history[r["step"]][key] == pytest.approx(value, rel=1e-12), (r["step"], key)
    assert config == json.loads((workdir / "config.json").read_text())
    assert config["logging"]["wandb_project"] == "test" and config["resolved"]["model"]["vocab_size"] > 0


def test_without_a_project_wandb_is_never_imported(tmp_path):
    code = (
        "import sys; from experiments import run; "
        f"rc = run.main(['run', *{SMOKE[2:]!r}, '--workdir={tmp_path}', '--config.train.steps=2']); "
        "print('wandb imported:', 'wandb' in sys.modules); sys.exit(rc)"
    )
    result = run_module("-c", code, env=ONE_DEVICE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wandb imported: False" in result.stdout
    assert not (tmp_path / metrics.WANDB_ID_FILE).exists()


def test_missing_wandb_is_one_config_error(monkeypatch):
    from configs import common

    logging = common.get_base_config().logging
    metrics.check_wandb(logging)  # off: nothing is looked up
    logging.wandb_project = "test"
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"config.logging.wandb_project='test'.*pip install wandb"):
        metrics.check_wandb(logging)


CONFIGS = sorted(p for p in glob.glob("configs/*/*.py") if not p.endswith("__init__.py"))


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_has_the_logging_section(path):
    from configs import common
    from experiments import overrides

    assert overrides.load_config(path).logging.to_dict() == common.logging_config().to_dict()
