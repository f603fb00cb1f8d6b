"""Bootstrap confidence intervals: resample rows with replacement, refit, take percentiles.

Approach 3 refits every resample at once: a resample is a row of per-point weights (how many
times each row was drawn) in the same vectorised L-BFGS, started from the full-data fit and a
few neighbours of it. Approaches 1 and 2 are closed-form regressions, refitted in a loop.
"""

from collections.abc import Callable

import numpy as np

from lm.errors import UserError
from lm.scaling import chinchilla


def resample_counts(n: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """[R, n] int: how often each of n rows is drawn in each of R resamples of size n."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in draws])


def percentile_intervals(samples: dict, level: float = 0.95) -> dict:
    """{name: (lo, hi)}: the central `level` percentile interval of each [R] sample, NaNs ignored."""
    tail = 50 * (1 - level)
    out = {}
    for name, values in samples.items():
        values = np.asarray(values, np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            lo, hi = np.percentile(values, [tail, 100 - tail])
            out[name] = (float(lo), float(hi))
    return out


def neighbour_starts(theta, scale: float = 0.1) -> np.ndarray:
    """theta [5] and 4 neighbours with alpha or beta moved by a factor (1 +- scale): [5, 5]."""
    starts = np.repeat(np.asarray(theta, np.float64)[None], 5, 0)
    for row, (col, factor) in enumerate(((3, 1 + scale), (3, 1 - scale), (4, 1 + scale), (4, 1 - scale)), 1):
        starts[row, col] *= factor
    return starts


def bootstrap_approach3(
    N,
    D,
    loss,
    fit: chinchilla.Approach3Fit,
    budgets=(),
    n_resamples: int = 1000,
    seed: int = 0,
    starts=None,
    gtol: float = 1e-10,
    ftol: float = 0.0,
    max_iter: int = 1000,
) -> dict:
    """Approach 3 refitted on `n_resamples` resamples in one vectorised L-BFGS.

    N, D, loss: [n]; fit: the full-data fit; starts: [K, 5] starts of every resample (default
    `neighbour_starts(fit.theta)`), the best of the K kept per resample. The tolerances are far
    tighter than scipy's defaults: from the full-data optimum, a relative-decrease test stops
    most refits at their start and the intervals come out far too narrow. Returns
    `chinchilla.approach3_quantities` of the refits: {name: [R]}.
    """
    starts = neighbour_starts(fit.theta) if starts is None else np.asarray(starts, np.float64)
    k = len(starts)
    counts = resample_counts(len(np.asarray(loss)), n_resamples, seed)
    res = chinchilla.minimize_starts(
        N,
        D,
        loss,
        np.tile(starts, (n_resamples, 1)),
        weights=np.repeat(counts, k, axis=0),
        gtol=gtol,
        ftol=ftol,
        max_iter=max_iter,
    )
    value = np.where(np.isfinite(res.value), res.value, np.inf).reshape(n_resamples, k)
    theta = res.x.reshape(n_resamples, k, 5)[np.arange(n_resamples), np.argmin(value, 1)]
    a, b, e, alpha, beta = theta.T
    return chinchilla.approach3_quantities(np.exp(e), np.exp(a), np.exp(b), alpha, beta, budgets)


def bootstrap_rows(quantities_fn: Callable, n_rows: int, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Refits `quantities_fn(rows [n] int) -> {name: float}` on each resample of the row indices.

    Resamples on which the fit fails with a UserError (say, too few distinct sizes left) are
    skipped. Returns {name: [R']} over the successful refits.
    """
    counts = resample_counts(n_rows, n_resamples, seed)
    samples = []
    for row_counts in counts:
        try:
            samples.append(quantities_fn(np.repeat(np.arange(n_rows), row_counts)))
        except UserError:
            continue
    if not samples:
        raise UserError(f"no bootstrap resample could be fitted ({n_resamples} tried)")
    return {name: np.array([s[name] for s in samples], np.float64) for name in samples[0]}
