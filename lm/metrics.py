"""Run outputs: metrics.jsonl (one JSON object per logged step), TensorBoard events, a progress bar."""

import json
import math
import os

import jax
import tqdm


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to `path` via a temporary file and a rename, so readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


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
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


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
