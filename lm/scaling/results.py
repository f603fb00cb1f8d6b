"""Fit inputs from disk: a CSV of runs (a sweep's results.csv, or any table with N/D/C/loss
columns) and, for Approach 1, each run's loss curve from `<csv dir>/<name>/metrics.jsonl`.

Every mistake in the files is a DataError naming the file (and line, column or run).
"""

import csv
import math
import os
from typing import NamedTuple

import numpy as np

from lm.errors import DataError


class Table(NamedTuple):
    """The kept rows of a CSV: rows[i] maps column -> text; lines[i] is its line in the file."""

    path: str
    columns: tuple
    rows: tuple
    lines: tuple


def read_table(path: str) -> Table:
    """Reads a CSV with a header; if it has a `status` column, keeps only `completed` rows."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (no header)")
        rows, lines = [], []
        for row in reader:
            rows.append(row)
            lines.append(reader.line_num)
    columns = tuple(reader.fieldnames)
    if "status" in columns:
        kept = [i for i, r in enumerate(rows) if r["status"] == "completed"]
        rows, lines = [rows[i] for i in kept], [lines[i] for i in kept]
    if not rows:
        raise DataError(f"{path}: no " + ("completed " if "status" in columns else "") + "rows")
    return Table(path, columns, tuple(rows), tuple(lines))


def require_column(table: Table, name: str, why: str = "") -> None:
    """Raises a DataError naming `name` (and `why` it is needed) and the columns present, if it is missing."""
    if name not in table.columns:
        raise DataError(f"{table.path}: no column {name!r}{why}; columns present: {', '.join(table.columns)}")


def column(table: Table, name: str, positive: bool = True) -> np.ndarray:
    """Column `name` as float64 [n]; every value must be a finite number (and > 0 if `positive`)."""
    require_column(table, name)
    out = np.empty(len(table.rows))
    for i, (row, line) in enumerate(zip(table.rows, table.lines)):
        text = row[name]
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise DataError(
                f"{table.path}:{line}: column {name!r} has a non-numeric value {text!r}"
            ) from None
        if not math.isfinite(value) or (positive and value <= 0):
            need = "a positive number" if positive else "a finite number"
            raise DataError(f"{table.path}:{line}: column {name!r} must be {need}, got {text!r}")
        out[i] = value
    return out


def fit_inputs(table: Table, n_col: str, loss_col: str, d_col: str | None, c_col: str | None):
    """(N, D, C, loss), each [n]. d_col / c_col None means `D` / `C` if present: an absent D is
    C / (6 N), an absent C is 6 N D; a column named explicitly must exist."""
    N, loss = column(table, n_col), column(table, loss_col)
    d_name = d_col or ("D" if "D" in table.columns else None)
    c_name = c_col or ("C" if "C" in table.columns else None)
    if d_name is None and c_name is None:
        raise DataError(
            f"{table.path}: needs a tokens column (D) or a FLOPs column (C); "
            f"columns present: {', '.join(table.columns)}"
        )
    D = column(table, d_name) if d_name else None
    C = column(table, c_name) if c_name else None
    return N, (C / (6 * N) if D is None else D), (6 * N * D if C is None else C), loss


def without_highest(loss, k: int) -> np.ndarray:
    """Indices [n - k] (in order) of the rows of loss [n] left after dropping the k highest."""
    if k >= len(loss):
        raise DataError(f"--drop_highest {k} leaves no points (there are {len(loss)})")
    return np.sort(np.argsort(loss, kind="stable")[: len(loss) - max(k, 0)])


def read_curves(csv_path: str, names, N, D, C):
    """Every logged training point of every run, for Approach 1.

    Reads `<csv dir>/<name>/metrics.jsonl` for each run (names, N, D, C: [runs], the runs' names
    and totals); uses the records with a finite `loss` and `tokens_seen` > 0, and
    C_seen = C * tokens_seen / D. Returns (run [p] int index into names, N [p], D_seen [p],
    C_seen [p], loss [p]).
    """
    from lm.metrics import read_jsonl

    out = []
    for i, name in enumerate(names):
        path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), name, "metrics.jsonl")
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file (Approach 1 needs the loss curve of run {name!r})")
        for r in read_jsonl(path):
            loss, seen = _finite(r.get("loss")), _finite(r.get("tokens_seen"))
            if loss is not None and seen is not None and seen > 0:
                out.append((i, N[i], seen, C[i] * seen / D[i], loss))
    if not out:
        raise DataError(f"{csv_path}: no run has a logged training loss with tokens_seen")
    return tuple(np.array(v) for v in zip(*out))


def _finite(v):
    """float(v) if v is a finite number, else None (metrics.jsonl writes NaN/inf as strings)."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
