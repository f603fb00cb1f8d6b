"""Hoffmann et al. 2022 (Chinchilla) compute-optimal scaling fits.

Approach 1: the minimum-loss envelope over training curves.
Approach 2: IsoFLOP profiles, a parabola of loss in log N per budget.
Approach 3: L(N, D) = E + A/N^alpha + B/D^beta, fitted as Epoch AI did (Besiroglu et al. 2024):
  log L is predicted as logsumexp(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b,
  E = e^e; the sum of Huber losses (delta = 1e-3) against the observed log L is minimised in
  float64 by L-BFGS from every start of a 4,500-point grid, and the best final objective is kept.
Budgets are training FLOPs C ~ 6 N D. Every fit is a function of arrays.
"""

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import DataError
from lm.scaling import lbfgs
from lm.scaling.kaplan import fit_power_law

HUBER_DELTA = 1e-3
# Epoch AI's initialisation grid: 5 * 5 * 5 * 6 * 6 = 4,500 starts.
EPOCH_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


def budget_key(name: str, C: float) -> str:
    """Name of a per-budget quantity, e.g. `N_opt@5.76e+23`."""
    return f"{name}@{C:.6g}"


# ----------------------------------------------------------------------------- Approach 1


class Approach1Fit(NamedTuple):
    """Envelope points C, N_opt, D_opt, loss: [g]; N_opt = k_N C^a, D_opt = k_D C^b."""

    C: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    loss: np.ndarray
    k_N: float
    a: float
    k_D: float
    b: float


def loss_envelope(run, N, D, C, loss, num_points: int = 30, min_runs: int = 2):
    """The minimum-loss run at each budget of a log grid over the training curves.

    Args:
      run: [n] run id of each logged point (any sortable type); N: [n] the run's parameters;
        D, C, loss: [n] tokens and FLOPs seen so far and the loss at that point.
      num_points: grid points, log-spaced over the range of C.
      min_runs: a grid budget counts only where at least this many curves reach it.
    Returns:
      (C, N_opt, D_opt, loss), each [g]: per grid budget, the run with the lowest loss (curves
      interpolated linearly in log C), its N, its tokens seen there, and that loss. Budgets won
      by the smallest or the largest model are left out: the optimum may lie beyond them.
    """
    N, D, C, loss = (np.asarray(v, np.float64) for v in (N, D, C, loss))
    ids, inverse = np.unique(np.asarray(run), return_inverse=True)
    log_c = np.log(C)
    grid = np.linspace(log_c.min(), log_c.max(), num_points)
    curve_loss = np.full((len(ids), num_points), np.inf)
    curve_log_d = np.zeros((len(ids), num_points))
    run_n = np.zeros(len(ids))
    for r in range(len(ids)):
        mine = np.nonzero(inverse == r)[0]
        mine = mine[np.argsort(log_c[mine])]
        inside = (grid >= log_c[mine[0]]) & (grid <= log_c[mine[-1]])
        curve_loss[r, inside] = np.interp(grid[inside], log_c[mine], loss[mine])
        curve_log_d[r, inside] = np.interp(grid[inside], log_c[mine], np.log(D[mine]))
        run_n[r] = N[mine[0]]
    best = np.argmin(curve_loss, 0)
    edge = (run_n[best] == run_n.min()) | (run_n[best] == run_n.max())
    cols = np.nonzero((np.sum(np.isfinite(curve_loss), 0) >= min_runs) & ~edge)[0]
    best = best[cols]
    return np.exp(grid[cols]), run_n[best], np.exp(curve_log_d[best, cols]), curve_loss[best, cols]


def fit_approach1(run, N, D, C, loss, num_points: int = 30, min_runs: int = 2) -> Approach1Fit:
    """Approach 1: power laws N_opt = k_N C^a, D_opt = k_D C^b through the loss envelope.

    Inputs as for `loss_envelope` ([n] per logged point of every run).
    """
    c, n_opt, d_opt, env_loss = loss_envelope(run, N, D, C, loss, num_points, min_runs)
    if len(c) < 2 or len(np.unique(n_opt)) < 2:
        raise DataError(
            f"Approach 1 needs the envelope to pass through at least 2 model sizes; it has "
            f"{len(c)} budgets and {len(np.unique(n_opt))} sizes (need more runs or longer curves)"
        )
    k_n, a = fit_power_law(c, n_opt)
    k_d, b = fit_power_law(c, d_opt)
    return Approach1Fit(c, n_opt, d_opt, env_loss, k_n, a, k_d, b)


# ----------------------------------------------------------------------------- Approach 2


class Parabola(NamedTuple):
    """loss = c2 x^2 + c1 x + c0 with x = ln N, fitted to one budget's points.

    coeffs: [3] (c2, c1, c0); log_n_range: the fitted points' (min, max) ln N; valid: it has a
    minimum inside that range, at N_opt with loss_opt.
    """

    C: float
    coeffs: np.ndarray
    log_n_range: tuple
    N_opt: float
    loss_opt: float
    valid: bool


class Approach2Fit(NamedTuple):
    """Per-budget parabolas (all), the valid minima C, N_opt, D_opt: [k], and their power laws."""

    parabolas: tuple
    C: np.ndarray
    N_opt: np.ndarray
    D_opt: np.ndarray
    k_N: float
    a: float
    k_D: float
    b: float


def group_budgets(C, rel_tol: float = 0.1):
    """Clusters C: [n] into budgets whose members all lie within a factor (1 + rel_tol) of each
    other (sorted, a cluster closes when the next value is too far above its smallest member).

    Returns (group [n] int, budgets [k]) with each budget the geometric mean of its members.
    """
    log_c = np.log(np.asarray(C, np.float64))
    order = np.argsort(log_c)
    group = np.empty(len(log_c), int)
    k, first = -1, -np.inf
    for i in order:
        if log_c[i] - first > np.log1p(rel_tol):
            k, first = k + 1, log_c[i]
        group[i] = k
    budgets = np.exp(np.array([log_c[group == j].mean() for j in range(k + 1)]))
    return group, budgets


def fit_parabola(N, loss, C: float) -> Parabola:
    """Least-squares parabola of loss in ln N for one budget's points N, loss: [m], m >= 3."""
    x = np.log(np.asarray(N, np.float64))
    coeffs = np.polyfit(x, np.asarray(loss, np.float64), 2)
    lo, hi = float(x.min()), float(x.max())
    if coeffs[0] <= 0:
        return Parabola(float(C), coeffs, (lo, hi), float("nan"), float("nan"), False)
    x_opt = -coeffs[1] / (2 * coeffs[0])
    return Parabola(
        float(C),
        coeffs,
        (lo, hi),
        float(np.exp(x_opt)),
        float(np.polyval(coeffs, x_opt)),
        bool(lo <= x_opt <= hi),
    )


def fit_approach2(N, C, loss, budget=None, rel_tol: float = 0.1, D=None) -> Approach2Fit:
    """Approach 2: IsoFLOP parabolas, then N_opt = k_N C^a and D_opt = k_D C^b.

    Args:
      N, C, loss: [n] parameters, training FLOPs and final loss of each run.
      budget: [n] nominal budget of each run (groups the runs and is their C in the power laws);
        None clusters C with `group_budgets(C, rel_tol)`.
      D: [n] tokens of each run, or None. Given, D_opt is read off the budget's own runs (log D
        linear in log N within a budget, at N_opt), which stays right when C is not counted as 6ND
        (e.g. the Chinchilla formula with attention); None: D_opt = C / (6 N_opt).
    A budget enters the power laws if it has >= 3 distinct N and its parabola has a minimum
    inside its sampled range of N.
    """
    N, C, loss = (np.asarray(v, np.float64) for v in (N, C, loss))
    if budget is None:
        group, budgets = group_budgets(C, rel_tol)
    else:
        budgets, group = np.unique(np.asarray(budget, np.float64), return_inverse=True)
    parabolas = tuple(
        fit_parabola(N[group == k], loss[group == k], c)
        for k, c in enumerate(budgets)
        if len(np.unique(N[group == k])) >= 3
    )
    used = [p for p in parabolas if p.valid]
    if len(used) < 2:
        raise DataError(
            f"Approach 2 needs at least 2 budgets with >= 3 model sizes and a loss minimum "
            f"inside them; found {len(used)} among {len(budgets)} budgets"
        )
    c = np.array([p.C for p in used])
    n_opt = np.array([p.N_opt for p in used])
    if D is None:
        d_opt = c / (6 * n_opt)
    else:
        log_d, log_n = np.log(np.asarray(D, np.float64)), np.log(N)
        members = [group == k for k, b in enumerate(budgets) if any(p.C == b for p in used)]
        d_opt = np.array(
            [np.exp(np.polyval(np.polyfit(log_n[m], log_d[m], 1), np.log(n))) for m, n in zip(members, n_opt)]
        )
    k_n, a = fit_power_law(c, n_opt)
    k_d, b = fit_power_law(c, d_opt)
    return Approach2Fit(parabolas, c, n_opt, d_opt, k_n, a, k_d, b)


def power_law_quantities(k_N, a, k_D, b, budgets=(), G=float("nan")) -> dict:
    """Approach 1/2 quantities by name: the coefficients, a, b, G, and per budget N_opt, D_opt,
    tokens_per_param (loss is NaN: these approaches predict none). Arrays broadcast ([R] ok)."""
    out = {"k_N": k_N, "a": a, "k_D": k_D, "b": b, "G": G}
    for c in budgets:
        n_opt, d_opt = k_N * c**a, k_D * c**b
        out.update(
            {
                budget_key("N_opt", c): n_opt,
                budget_key("D_opt", c): d_opt,
                budget_key("tokens_per_param", c): d_opt / n_opt,
                budget_key("loss", c): np.full(np.shape(n_opt), np.nan),
            }
        )
    return out


# ----------------------------------------------------------------------------- Approach 3


class Approach3Fit(NamedTuple):
    """L = E + A/N^alpha + B/D^beta; objective: the summed Huber loss at theta [5] =
    (a, b, e, alpha, beta) = (ln A, ln B, ln E, alpha, beta)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    theta: np.ndarray


def grid_starts(grid: dict = None) -> np.ndarray:
    """Starts [S, 5] as (a, b, e, alpha, beta): the product of `grid`'s values, Epoch's 4,500-point
    grid by default, in Epoch's order (alpha outermost, then beta, e, a, b)."""
    g = EPOCH_GRID if grid is None else grid
    rows = itertools.product(g["alpha"], g["beta"], g["e"], g["a"], g["b"])
    return np.array([(a, b, e, alpha, beta) for alpha, beta, e, a, b in rows], np.float64)


def predict_log_loss(theta, log_n, log_d):
    """log L for theta [S, 5] at log N, log D: [n] -> [S, n] (jnp)."""
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    return jnp.logaddexp(jnp.logaddexp(a - alpha * log_n, b - beta * log_d), e)


def huber(r, delta: float):
    """Huber loss of residuals r: [...] (quadratic within delta, linear outside)."""
    abs_r = jnp.abs(r)
    return jnp.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def huber_objective(theta, weights, log_n, log_d, log_loss, delta: float = HUBER_DELTA):
    """Per-start objective [S]: sum_i weights[s, i] * huber(pred[s, i] - log_loss[i]).

    theta: [S, 5]; weights: [S, n] (ones, or bootstrap counts); log_n, log_d, log_loss: [n].
    """
    return jnp.sum(weights * huber(predict_log_loss(theta, log_n, log_d) - log_loss, delta), -1)


def huber_value_and_grad(theta, weights, log_n, log_d, log_loss, delta: float = HUBER_DELTA, xp=jnp):
    """`huber_objective` [S] and its gradient [S, 5] by hand, in numpy (xp=np) or JAX.

    Same arguments as `huber_objective`. The gradient shares the objective's exponentials, which
    makes the fit about 2.4x faster than autodiff of the logsumexp form. The sum of exponentials
    is not shifted by its maximum: it overflows only past e^709, and the line search rejects a
    trial whose objective is not finite.
    """
    a, b, e, alpha, beta = (theta[:, i : i + 1] for i in range(5))
    t_n, t_d, t_e = xp.exp(a - alpha * log_n), xp.exp(b - beta * log_d), xp.exp(e)
    z = t_n + t_d + t_e
    r = xp.log(z) - log_loss
    slope = xp.clip(r, -delta, delta)  # d huber / d r
    value = xp.sum(weights * slope * (r - 0.5 * slope), -1)
    w = weights * slope / z
    s_n, s_d = w * t_n, w * t_d
    grad = xp.stack(
        [s_n.sum(-1), s_d.sum(-1), w.sum(-1) * t_e[:, 0], -(s_n * log_n).sum(-1), -(s_d * log_d).sum(-1)], -1
    )
    return value, grad


@functools.partial(jax.jit, static_argnames=("delta", "max_iter", "width"))
def _minimize(starts, weights, log_n, log_d, log_loss, *, delta, max_iter, width, gtol, ftol):
    value_and_grad = lambda theta, w: huber_value_and_grad(theta, w, log_n, log_d, log_loss, delta)
    return lbfgs.minimize(
        value_and_grad, starts, weights, width=width, max_iter=max_iter, gtol=gtol, ftol=ftol
    )


def minimize_starts(
    N,
    D,
    loss,
    starts,
    weights=None,
    delta: float = HUBER_DELTA,
    max_iter: int = 1000,
    gtol: float = 1e-5,
    ftol: float = 2.220446049250313e-09,
    width: int = 256,
) -> lbfgs.Result:
    """L-BFGS of the Huber objective from every start at once, in float64.

    N, D, loss: [n]; starts: [S, 5] as (a, b, e, alpha, beta); weights: [S, n] per-start row weights, or None
    for all ones. Returns the per-start lbfgs.Result as numpy arrays.
    """
    starts = np.asarray(starts, np.float64)
    n = len(np.asarray(loss))
    weights = np.ones((len(starts), n)) if weights is None else np.asarray(weights, np.float64)
    with jax.enable_x64(True):
        args = [jnp.asarray(v, jnp.float64) for v in (starts, weights, np.log(N), np.log(D), np.log(loss))]
        res = _minimize(*args, delta=delta, max_iter=max_iter, width=width, gtol=gtol, ftol=ftol)
        return lbfgs.Result(*(np.asarray(v) for v in res))


def best_of(theta, objective) -> Approach3Fit:
    """The start with the lowest finite objective: theta [S, 5], objective [S]."""
    objective = np.where(np.isfinite(objective), objective, np.inf)
    i = int(np.argmin(objective))
    if not np.isfinite(objective[i]):
        raise DataError("Approach 3: no start reached a finite objective")
    a, b, e, alpha, beta = (float(v) for v in theta[i])
    return Approach3Fit(
        np.exp(e), np.exp(a), np.exp(b), alpha, beta, float(objective[i]), np.asarray(theta[i], np.float64)
    )


def check_points(N, D, loss, minimum: int = 6) -> None:
    """Approach 3 has 5 parameters: it needs at least `minimum` points N, D, loss: [n]."""
    if len(np.asarray(loss)) < minimum:
        raise DataError(f"Approach 3 needs at least {minimum} points to fit 5 parameters; got {len(loss)}")


def fit_approach3(
    N,
    D,
    loss,
    starts=None,
    delta: float = HUBER_DELTA,
    max_iter: int = 1000,
    gtol: float = 1e-5,
    ftol: float = 2.220446049250313e-09,
) -> Approach3Fit:
    """Approach 3 (Epoch's procedure), vectorised over starts. N, D, loss: [n]; starts: [S, 5]
    as (a, b, e, alpha, beta), Epoch's grid by default. Returns the best fit over all starts."""
    check_points(N, D, loss)
    starts = grid_starts() if starts is None else np.asarray(starts, np.float64)
    res = minimize_starts(N, D, loss, starts, delta=delta, max_iter=max_iter, gtol=gtol, ftol=ftol)
    return best_of(res.x, res.value)


def fit_approach3_scipy(N, D, loss, starts=None, delta: float = HUBER_DELTA) -> Approach3Fit:
    """Approach 3 as Epoch ran it: a Python loop of scipy L-BFGS-B (default tolerances) over the
    starts [S, 5] (Epoch's grid by default), with the analytic gradient; best objective kept.
    The baseline for the vectorised `fit_approach3`. N, D, loss: [n]."""
    from scipy import optimize
    from threadpoolctl import threadpool_limits

    check_points(N, D, loss)
    starts = grid_starts() if starts is None else np.asarray(starts, np.float64)
    log_n, log_d, log_loss = (np.log(np.asarray(v, np.float64)) for v in (N, D, loss))

    def value_and_grad(theta):
        value, grad = huber_value_and_grad(theta[None], 1.0, log_n, log_d, log_loss, delta, xp=np)
        return value[0], grad[0]

    finals, values = [], []
    # L-BFGS-B's BLAS calls on 5-vectors gain nothing from threads and pay for every hand-off:
    # with OpenBLAS's default threads this loop ran 45x slower on a busy 2-core machine.
    with threadpool_limits(1, user_api="blas"), np.errstate(all="ignore"):
        for x0 in starts:
            r = optimize.minimize(value_and_grad, x0, jac=True, method="L-BFGS-B")
            finals.append(r.x)
            values.append(r.fun)
    return best_of(np.array(finals), np.array(values))


def approach3_quantities(E, A, B, alpha, beta, budgets=()) -> dict:
    """Approach 3 quantities by name: E, A, B, alpha, beta; the allocation a = beta/(alpha+beta),
    b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)); and per budget C
    N_opt = G (C/6)^a, D_opt = (C/6)^b / G, tokens_per_param, loss = L(N_opt, D_opt).
    Parameters may be arrays (e.g. bootstrap samples [R]); outputs broadcast."""
    with np.errstate(all="ignore"):
        s = alpha + beta
        a, b = beta / s, alpha / s
        G = (alpha * A / (beta * B)) ** (1 / s)
        out = {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta, "a": a, "b": b, "G": G}
        for c in budgets:
            n_opt, d_opt = G * (c / 6) ** a, (c / 6) ** b / G
            out.update(
                {
                    budget_key("N_opt", c): n_opt,
                    budget_key("D_opt", c): d_opt,
                    budget_key("tokens_per_param", c): d_opt / n_opt,
                    budget_key("loss", c): E + A / n_opt**alpha + B / d_opt**beta,
                }
            )
    return out


def approach3_loss(fit: Approach3Fit, N, D):
    """L(N, D) = E + A/N^alpha + B/D^beta for N, D: [...]."""
    return (
        fit.E + fit.A / np.asarray(N, np.float64) ** fit.alpha + fit.B / np.asarray(D, np.float64) ** fit.beta
    )
