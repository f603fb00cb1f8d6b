"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, a progress bar."""

import contextlib
import json
import math
import os

import jax
import tqdm


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


class MetricsWriter:
    """Appends metric records to workdir/metrics.jsonl and TensorBoard; only process 0 writes."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            truncate_jsonl(self.path, resume_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(workdir, purge_step=resume_step + 1 if resume_step else None)
            self._file = open(self.path, "a", buffering=1)

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

    def close(self) -> None:
        if self.active:
            self._file.close()
            self._tb.close()


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
