"""Approach 3 by variable projection: a search over the two exponents (alpha, beta) only.

For fixed (alpha, beta), L = E + A x + B y with x = N^-alpha, y = D^-beta is linear in
(E, A, B). Czech et al. 2026 profile these out: at each (alpha, beta) of a grid, (E, A, B) >= 0
is a non-negative linear least-squares problem, and the search is over two numbers.

Here the objective is kept the same as the L-BFGS grid's (`chinchilla.huber_objective`, Epoch's
Huber loss with delta = 1e-3 on the residuals of log L), so both solvers can be held to one
optimum. For fixed exponents that objective is not a linear least squares, so the profile is
built in two stages:
  1. Czech et al.'s NNLS profile on a grid of (alpha, beta), with each point's residual divided
     by its loss, (L_i - pred_i) / L_i: the first-order expansion of the log residual. It only
     picks where to start.
  2. From the best local minima of that profile, Newton's method on the profile of the Huber
     objective itself, phi(alpha, beta) = min over (ln A, ln B, ln E) of the objective: every
     evaluation solves the 3-variable inner problem by Newton's method from its NNLS solution;
     phi's gradient is the objective's (alpha, beta) gradient at the inner optimum (the envelope
     theorem) and its Hessian the Schur complement of the inner block in the full 5 x 5 Hessian.
(E, A, B) are searched in logs as in the grid's parametrisation, so both solvers cover the same
set of laws (E, A, B > 0). Everything is numpy, float64.
"""

import numpy as np

from lm.errors import DataError
from lm.scaling import chinchilla

PROFILE_GRID = np.linspace(0.02, 2.0, 100)  # alpha and beta values of stage 1
# The 7 non-empty supports of (E, A, B) and the empty one, as masks [8, 3].
SUPPORTS = np.array([[(s >> k) & 1 for k in range(3)] for s in range(8)], bool)


def nnls3(gram, rhs):
    """Batched non-negative least squares in 3 unknowns from its normal equations.

    gram: [..., 3, 3] positive definite M^T W M; rhs: [..., 3] M^T W L. Returns (u [..., 3] >= 0
    minimising |W^1/2 (M u - L)|^2, and that minimum less |W^1/2 L|^2, [...]). Exact: the NNLS
    solution is the unconstrained solution on its own support, so it is the best of the feasible
    support solutions (the empty support gives 0).
    """
    scale = 1.0 / np.sqrt(np.diagonal(gram, axis1=-2, axis2=-1))  # equilibrates the columns
    g = gram * scale[..., :, None] * scale[..., None, :]
    h = rhs * scale
    best_u, best_val = np.zeros(h.shape), np.zeros(h.shape[:-1])
    for mask in SUPPORTS[1:]:
        on = mask.astype(np.float64)
        # The tiny ridge keeps exactly collinear columns (e.g. a single model size) solvable.
        g_s = g * np.outer(on, on) + np.diag(1.0 - on) + 1e-12 * np.eye(3)
        u = np.linalg.solve(g_s, (h * on)[..., None])[..., 0]
        val = -np.sum(h * u, -1)
        better = np.all(u >= 0, -1) & (val < best_val)
        best_u = np.where(better[..., None], u, best_u)
        best_val = np.where(better, val, best_val)
    return best_u * scale, best_val


def nnls_profile(log_n, log_d, loss, alphas, betas):
    """Czech et al.'s profile with relative residuals: for every (alpha, beta) of the grid, the
    (E, A, B) >= 0 minimising sum_i ((L_i - E - A N_i^-alpha - B D_i^-beta) / L_i)^2.

    log_n, log_d, loss: [n]; alphas: [p]; betas: [q]. Returns (u [p, q, 3] as (E, A, B),
    residual sum of squares [p, q]).
    """
    w = 1.0 / loss**2
    x = np.exp(-np.outer(alphas, log_n))  # [p, n]
    y = np.exp(-np.outer(betas, log_d))  # [q, n]
    p, q = len(alphas), len(betas)
    gram = np.empty((p, q, 3, 3))
    gram[..., 0, 0] = w.sum()
    gram[..., 0, 1] = gram[..., 1, 0] = (x @ w)[:, None]
    gram[..., 0, 2] = gram[..., 2, 0] = (y @ w)[None, :]
    gram[..., 1, 1] = (x**2 @ w)[:, None]
    gram[..., 2, 2] = (y**2 @ w)[None, :]
    gram[..., 1, 2] = gram[..., 2, 1] = (x * w) @ y.T
    rhs = np.empty((p, q, 3))
    rhs[..., 0] = w @ loss
    rhs[..., 1] = (x @ (w * loss))[:, None]
    rhs[..., 2] = (y @ (w * loss))[None, :]
    u, val = nnls3(gram, rhs)
    return u, val + np.sum(w * loss**2)


def grid_minima(values, k: int):
    """Indices [<= k, 2] of the k lowest local minima (over the 8 neighbours) of values [p, q];
    non-finite values count as +inf."""
    values = np.where(np.isfinite(values), values, np.inf)
    padded = np.pad(values, 1, constant_values=np.inf)
    p, q = values.shape
    neighbours = [padded[1 + i : 1 + i + p, 1 + j : 1 + j + q] for i in (-1, 0, 1) for j in (-1, 0, 1)]
    is_min = np.isfinite(values) & np.all([values <= nb for nb in neighbours], 0)
    idx = np.argwhere(is_min)
    return idx[np.argsort(values[is_min])[:k]]


def value_grad_hess(theta, log_n, log_d, log_loss, delta: float = chinchilla.HUBER_DELTA):
    """The Huber objective at theta [5] = (a, b, e, alpha, beta), its gradient [5] and Hessian
    [5, 5]; log_n, log_d, log_loss: [n]. The Hessian is the objective's where no residual sits
    exactly at +-delta (the Huber loss has no second derivative there)."""
    a, b, e, alpha, beta = theta
    t = np.stack([np.exp(a - alpha * log_n), np.exp(b - beta * log_d), np.full(len(log_n), np.exp(e))])
    z = t.sum(0)
    prob = t / z  # [3, n]: each term's share of the predicted loss
    r = np.log(z) - log_loss
    slope = np.clip(r, -delta, delta)
    zero, one = np.zeros_like(log_n), np.ones_like(log_n)
    # d(term k)/d theta / term k, per point: [3, n, 5]
    c = np.stack(
        [
            np.stack([one, zero, zero, -log_n, zero], -1),
            np.stack([zero, one, zero, zero, -log_d], -1),
            np.stack([zero, zero, one, zero, zero], -1),
        ]
    )
    jac = np.einsum("kn,knj->nj", prob, c)  # dr/dtheta [n, 5]
    curvature = (np.abs(r) <= delta).astype(np.float64)
    hess = np.einsum("n,ni,nj->ij", curvature - slope, jac, jac)
    hess += np.einsum("kn,kni,knj->ij", slope * prob, c, c)
    return float(np.sum(slope * (r - 0.5 * slope))), slope @ jac, hess


def newton(fun, x0, max_iter: int = 200, c1: float = 1e-4):
    """Minimises a small smooth function by Newton's method with backtracking.

    fun(x [P]) -> (value, grad [P], hess [P, P]) or None where x is out of its domain; x0: [P].
    An indefinite Hessian has its eigenvalues replaced by their magnitudes (floored relative to
    the largest), so every step descends. Stops when a step no longer lowers the value or the
    gradient is zero. Returns (x [P], value, grad [P], hess [P, P]); (x0, inf, None, None) where
    x0 is out of the domain.
    """
    x = np.asarray(x0, np.float64)
    first = fun(x)
    if first is None:
        return x, np.inf, None, None
    f, g, h = first
    for _ in range(max_iter):
        if not np.any(g):
            break
        lam, vec = np.linalg.eigh(h)
        lam = np.maximum(np.abs(lam), 1e-12 * max(np.abs(lam).max(), 1e-300))
        step = -vec @ ((vec.T @ g) / lam)
        slope = g @ step
        for t in 0.5 ** np.arange(60):
            trial = fun(x + t * step)
            if trial is not None and trial[0] <= f + c1 * t * slope:
                break
        else:
            break
        if trial[0] >= f:
            break
        x, (f, g, h) = x + t * step, trial
    return x, f, g, h


def inner_start(alpha, beta, log_n, log_d, loss):
    """(a, b, e) [3] to start the inner problem at (alpha, beta): the logs of the relative-residual
    NNLS solution, a zero coefficient floored at 1e-6 of its term's typical share of the loss."""
    (u,), _ = nnls_profile(log_n, log_d, loss, np.array([alpha]), np.array([beta]))
    E, A, B = u[0]
    typical = loss.mean() / np.array([np.exp(-alpha * log_n).mean(), np.exp(-beta * log_d).mean(), 1.0])
    floor = 1e-6 * typical
    return np.log(np.maximum([A, B, E], floor))


def solve_inner(exponents, log_n, log_d, loss, delta: float = chinchilla.HUBER_DELTA):
    """The Huber objective minimised over (a, b, e) at fixed exponents [2] = (alpha, beta).

    Returns (theta [5] at the inner optimum, value, full gradient [5], full Hessian [5, 5]).
    """
    log_loss = np.log(loss)
    alpha, beta = exponents

    def inner(u):
        value, grad, hess = value_grad_hess(np.r_[u, alpha, beta], log_n, log_d, log_loss, delta)
        return (value, grad[:3], hess[:3, :3]) if np.isfinite(value) else None

    u, *_ = newton(inner, inner_start(alpha, beta, log_n, log_d, loss))
    theta = np.r_[u, alpha, beta]
    return (theta, *value_grad_hess(theta, log_n, log_d, log_loss, delta))


def profile(exponents, log_n, log_d, loss, delta: float = chinchilla.HUBER_DELTA):
    """phi(alpha, beta) at exponents [2], its gradient [2] and Hessian [2, 2] (the Schur
    complement of the inner block), or None where the inner fit is not finite."""
    _, value, grad, hess = solve_inner(exponents, log_n, log_d, loss, delta)
    if not np.isfinite(value):
        return None
    h_uu, h_uv, h_vv = hess[:3, :3], hess[:3, 3:], hess[3:, 3:]
    return value, grad[3:], h_vv - h_uv.T @ np.linalg.lstsq(h_uu, h_uv, rcond=None)[0]


def fit_approach3_varpro(
    N,
    D,
    loss,
    alphas=PROFILE_GRID,
    betas=PROFILE_GRID,
    starts: int = 3,
    delta: float = chinchilla.HUBER_DELTA,
) -> chinchilla.Approach3Fit:
    """Approach 3 by variable projection, minimising the same objective as `fit_approach3`.

    N, D, loss: [n]; alphas: [p], betas: [q]: the stage-1 grid of exponents; starts: how many of
    its best local minima stage 2 starts from. Returns the best fit over those starts; its
    objective is `chinchilla.huber_objective` at its theta, as `fit_approach3`'s is.
    """
    chinchilla.check_points(N, D, loss)
    log_n, log_d = np.log(np.asarray(N, np.float64)), np.log(np.asarray(D, np.float64))
    loss = np.asarray(loss, np.float64)
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    with np.errstate(all="ignore"):
        _, rss = nnls_profile(log_n, log_d, loss, alphas, betas)
        phi = lambda v: profile(v, log_n, log_d, loss, delta)
        thetas, values = [], []
        for i, j in grid_minima(rss, starts):
            exponents, value, *_ = newton(phi, [alphas[i], betas[j]])
            thetas.append(solve_inner(exponents, log_n, log_d, loss, delta)[0])
            values.append(value)
    if not thetas:
        raise DataError("Approach 3 (varpro): the exponent grid has no finite profile value")
    return chinchilla.best_of(np.array(thetas), np.array(values))
