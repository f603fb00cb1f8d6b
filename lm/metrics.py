"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, Weights & Biases
(config.logging.wandb_project; optional), a progress bar."""

import contextlib
import importlib.util
import json
import math
import os
import secrets

import jax
import tqdm

from lm.errors import ConfigError, Preempted

WANDB_ID_FILE = "wandb_id"  # in the workdir: the W&B run id a resumed run appends to


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """The one atomic writer: yields a temporary path beside `path` (ending in `suffix`, for writers
    that add their own extension) and renames it onto `path` when the block succeeds, so readers
    never see half a file and a crash leaves the old one; the temporary file is removed on error."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes text or bytes to `path` through `atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to `path` through `atomic_path`."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str):
    """The JSON object in `path`, or None when the file does not exist."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_jsonl(path: str) -> list[dict]:
    """All complete records of a .jsonl file (a torn last line from a kill is ignored)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops records past `last_step` (logged after the checkpoint a resumed run starts from)."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def check_wandb(logging_cfg) -> None:
    """A ConfigError when config.logging.wandb_project is set and the wandb package is missing
    (found without importing it)."""
    if logging_cfg is not None and logging_cfg.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"config.logging.wandb_project={logging_cfg.wandb_project!r} needs the wandb package: "
            "pip install wandb"
        )


def open_wandb(workdir: str, logging_cfg):
    """The W&B run of `workdir` (config.logging), or None when wandb_project is ''.

    wandb is imported only here. The run's config is workdir/config.json as written (the user's keys,
    "resolved" and "run"); its id is kept in workdir/wandb_id, so a resumed run appends to the same
    W&B run. Files go to $WANDB_DIR, else the workdir.
    """
    if logging_cfg is None or not logging_cfg.wandb_project:
        return None
    check_wandb(logging_cfg)
    import wandb

    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(8)
        write_atomic(id_path, run_id + "\n")
    wandb_dir = os.environ.get("WANDB_DIR") or workdir
    os.makedirs(wandb_dir, exist_ok=True)
    return wandb.init(
        project=logging_cfg.wandb_project,
        entity=logging_cfg.wandb_entity or None,
        name=logging_cfg.wandb_run_name or os.path.basename(os.path.normpath(workdir)),
        group=logging_cfg.wandb_group or None,
        tags=[t.strip() for t in logging_cfg.wandb_tags.split(",") if t.strip()] or None,
        config=read_json(os.path.join(workdir, "config.json")) or {},
        id=run_id,
        resume="allow",
        dir=wandb_dir,
    )


def finish_wandb(run, error: BaseException | None = None) -> None:
    """Finishes a W&B run: exit code 0, 75 when preempted (marked preempting), else 1. With `error`
    (the exception the run is ending on), a failure to finish is printed, never raised over it."""
    if run is None:
        return
    try:
        if isinstance(error, Preempted):
            run.mark_preempting()
        run.finish(exit_code=0 if error is None else 75 if isinstance(error, Preempted) else 1)
    except Exception as e:
        if error is None:
            raise
        print(f"warning: W&B run not finished cleanly: {e}")


class MetricsWriter:
    """Appends metric records to workdir/metrics.jsonl, TensorBoard and, with
    config.logging.wandb_project set, Weights & Biases (`open_wandb`); only process 0 writes."""

    def __init__(self, workdir: str, resume_step: int = 0, logging_cfg=None):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = self._wandb = None
        if self.active:
            truncate_jsonl(self.path, resume_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(workdir, purge_step=resume_step + 1 if resume_step else None)
            self._file = open(self.path, "a", buffering=1)
            try:
                self._wandb = open_wandb(workdir, logging_cfg)
            except BaseException:
                self._file.close()
                self._tb.close()
                raise

    def write(self, step: int, metrics: dict) -> None:
        """Writes one record `{"step": step, **metrics}` (floats; NaN/inf kept as strings)."""
        if not self.active:
            return
        record = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            record[k] = v if math.isfinite(v) else str(v)
            self._tb.add_scalar(k, v, step)
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def close(self, error: BaseException | None = None) -> None:
        """Closes every output; `error`: the exception the run ends on (W&B records it as failed or
        preempted)."""
        if self.active:
            self._file.close()
            self._tb.close()
            finish_wandb(self._wandb, error)


def progress_bar(start_step: int, total_steps: int):
    """A tqdm bar over steps (shows step, rate and ETA; loss and tokens/s go in its postfix)."""
    return tqdm.tqdm(
        initial=start_step,
        total=total_steps,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=jax.process_index() != 0,
    )
