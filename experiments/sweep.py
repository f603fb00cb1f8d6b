"""Sweeps: a config file's `get_sweep(arg)` lists its members as override dicts; this runs them.

Each member is one ordinary run, `experiments.run ... --member NAME`, in its own subprocess and
workdir `DIR/<member>/`, so a member that crashes never takes the others with it. A member's outcome
is its `status.json`; `DIR/results.csv` is rebuilt from those files (atomically) whenever a member
finishes. A re-run skips completed members and resumes the rest from their checkpoints.

Launchers: `local` (subprocesses, `--parallel N` at a time), `slurm` (a submitit job array) and
`submitit-local` (submitit's LocalExecutor: the SLURM code path on one machine, used by the tests).
"""

import concurrent.futures
import csv
import io
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from experiments import overrides as overrides_lib
from lm import metrics as metrics_lib
from lm.errors import ConfigError

LAUNCHERS = ("local", "slurm", "submitit-local")
RESULT_COLUMNS = [
    "name",
    "status",
    "N",
    "N_nonembedding",
    "D",
    "C",
    "train_loss",
    "eval_loss",
    "eval_bits_per_byte",
    "wall_seconds",
]
TRAIN_LOSS_TAIL = 0.1  # train_loss: mean logged loss over the last 10% of steps (one step is noisy)


@dataclass(frozen=True)
class Member:
    name: str
    overrides: dict


def load_sweep(config_path: str, arg: str | None) -> list[Member] | None:
    """The members a config file declares through `get_sweep(arg)`, or None when it declares none."""
    module = overrides_lib.load_module(config_path)
    if not hasattr(module, "get_sweep"):
        return None
    overrides = module.get_sweep(arg) if arg is not None else module.get_sweep()
    members = [Member(member_name(o), dict(o)) for o in overrides]
    names = [m.name for m in members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{config_path}: get_sweep() declares the same member twice: {duplicates[0]}")
    if not members:
        raise ConfigError(f"{config_path}: get_sweep() declares no members")
    return members


def _format_value(value) -> str:
    if isinstance(value, float):
        mantissa, _, exponent = f"{value:g}".partition("e")
        return mantissa + (f"e{int(exponent)}" if exponent else "")
    if isinstance(value, (tuple, list)):
        return "x".join(_format_value(v) for v in value)
    return str(value)


def member_name(overrides: dict) -> str:
    """A directory-safe name from the overrides: {'scaling.budget': 3e12, 'model.d_model': 64}
    -> 'budget=3e12,d_model=64' (the last part of each key, in declaration order)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_format_value(v)}" for key, v in overrides.items()]
    return ",".join(parts).replace("/", "_").replace(" ", "") or "base"


# ---- one member ----------------------------------------------------------------------------------


def run_member(command: list[str], workdir: str) -> str:
    """Runs one member's command to the end, logging to workdir/log.txt; writes workdir/status.json.

    Returns the status ('completed' or 'failed'). Runs wherever it is called: in a thread of the local
    launcher or inside a submitit job.
    """
    os.makedirs(workdir, exist_ok=True)
    status_path = os.path.join(workdir, "status.json")
    attempts = (metrics_lib.read_json(status_path) or {}).get("attempts", 0) + 1
    metrics_lib.write_json_atomic(status_path, {"status": "running", "attempts": attempts})
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        returncode = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_MININTERVAL": "30"}
        ).returncode
    status = "completed" if returncode == 0 else "failed"
    metrics_lib.write_json_atomic(
        status_path,
        {
            "status": status,
            "returncode": returncode,
            "error": _last_error(workdir) if returncode else "",
            "wall_seconds": time.time() - start,
            "attempts": attempts,
        },
    )
    return status


def _last_error(workdir: str) -> str:
    """The member's one-line error (or the last line of its traceback) from its log."""
    with open(os.path.join(workdir, "log.txt"), errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1]


def member_command(config_arg: str, passthrough: list[str], workdir: str, name: str) -> list[str]:
    """The command line that runs member `name` of the sweep in `config_arg` as a plain run."""
    return [
        sys.executable,
        "-m",
        "experiments.run",
        f"--config={config_arg}",
        *passthrough,
        f"--workdir={workdir}",
        f"--member={name}",
    ]


# ---- results -------------------------------------------------------------------------------------


def member_row(sweep_dir: str, member: Member) -> dict:
    """One results.csv row from the member's status.json, config.json and metrics.jsonl."""
    workdir = os.path.join(sweep_dir, member.name)
    status = metrics_lib.read_json(os.path.join(workdir, "status.json")) or {}
    row = {
        "name": member.name,
        "status": status.get("status", "pending"),
        "wall_seconds": status.get("wall_seconds"),
    }
    run = (metrics_lib.read_json(os.path.join(workdir, "config.json")) or {}).get("run", {})
    if run:
        row.update(
            N=run["params"],
            N_nonembedding=run["param_counts"]["non_embedding"],
            D=run["scaling"]["tokens"],
            C=run["scaling"]["compute"],
        )
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    if records and row["status"] == "completed":
        last_step = records[-1]["step"]
        tail = [r["loss"] for r in records if "loss" in r and r["step"] > last_step * (1 - TRAIN_LOSS_TAIL)]
        row["train_loss"] = sum(tail) / len(tail) if tail else None
        evals = [r for r in records if "eval_loss" in r]
        if evals:
            row.update(eval_loss=evals[-1]["eval_loss"], eval_bits_per_byte=evals[-1]["eval_bits_per_byte"])
    row.update(member.overrides)
    return row


def write_results(sweep_dir: str, members: list[Member]) -> str:
    """Rewrites sweep_dir/results.csv (atomically): RESULT_COLUMNS, then one column per override."""
    override_keys = list(dict.fromkeys(k for m in members for k in m.overrides))
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=RESULT_COLUMNS + override_keys, restval="", lineterminator="\n"
    )
    writer.writeheader()
    for member in members:
        writer.writerow({k: _csv_value(v) for k, v in member_row(sweep_dir, member).items()})
    path = os.path.join(sweep_dir, "results.csv")
    metrics_lib.write_atomic(path, buffer.getvalue())
    return path


def _csv_value(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return value


# ---- the sweep -----------------------------------------------------------------------------------


def run_sweep(
    members: list[Member],
    *,
    config_arg: str,
    passthrough: list[str],
    sweep_dir: str,
    launcher: str = "local",
    parallel: int = 1,
    slurm: dict | None = None,
) -> dict:
    """Runs every member not yet completed; returns {status: count} over all members.

    Args:
      config_arg: the `--config` value (file[:arg]) each member re-reads.
      passthrough: the `--config.key=value` overrides given to the sweep, applied to every member.
      launcher: 'local' | 'slurm' | 'submitit-local'.
      parallel: members at once (local), or the job array's parallelism (SLURM).
      slurm: submitit parameters for the slurm launcher (e.g. slurm_partition, timeout_min).
    """
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher={launcher!r}: expected one of {LAUNCHERS}")
    if parallel < 1:
        raise ConfigError(f"--parallel={parallel}: must be at least 1")
    done = [m for m in members if member_row(sweep_dir, m)["status"] == "completed"]
    todo = [m for m in members if m not in done]
    print(
        f"sweep: {len(members)} members, {len(done)} completed, {len(todo)} to run "
        f"({launcher}, {parallel} at a time) -> {sweep_dir}",
        flush=True,
    )
    write_results(sweep_dir, members)
    jobs = [
        (
            member_command(config_arg, passthrough, os.path.join(sweep_dir, m.name), m.name),
            os.path.join(sweep_dir, m.name),
        )
        for m in todo
    ]
    lock = threading.Lock()

    def finished(member, status):
        with lock:
            write_results(sweep_dir, members)
            print(f"sweep: {member.name} {status}", flush=True)

    if launcher == "local":
        with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
            futures = {pool.submit(run_member, *job): m for m, job in zip(todo, jobs)}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
    elif todo:
        _run_submitit(todo, jobs, sweep_dir, launcher, parallel, slurm or {}, finished)
    counts = {}
    for member in members:
        status = member_row(sweep_dir, member)["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def _run_submitit(todo, jobs, sweep_dir, launcher, parallel, slurm, finished) -> None:
    """Submits the members as one job array and waits for it; each job runs `run_member`."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--launcher slurm needs submitit: pip install -e '.[slurm]'") from None
    cluster = "slurm" if launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=os.path.join(sweep_dir, "submitit", "%j"), cluster=cluster)
    executor.update_parameters(
        name=os.path.basename(sweep_dir.rstrip("/")) or "sweep", slurm_array_parallelism=parallel, **slurm
    )
    commands, workdirs = zip(*jobs)
    submitted = executor.map_array(run_member, commands, workdirs)
    print(
        f"sweep: submitted job array {submitted[0].job_id.split('_')[0]} ({len(submitted)} members)",
        flush=True,
    )
    pending = dict(zip(submitted, todo))
    while pending:
        for job in [j for j in pending if j.done()]:
            member = pending.pop(job)
            try:
                status = job.result()
            except Exception as e:  # the job itself died (node failure, time limit): record it
                status = "failed"
                status_path = os.path.join(sweep_dir, member.name, "status.json")
                previous = metrics_lib.read_json(status_path) or {}
                metrics_lib.write_json_atomic(
                    status_path,
                    {
                        "status": status,
                        "returncode": None,
                        "error": (str(e).strip().splitlines() or [""])[-1],
                        "wall_seconds": None,
                        "attempts": previous.get("attempts", 1),
                    },
                )
            finished(member, status)
        time.sleep(1.0)
