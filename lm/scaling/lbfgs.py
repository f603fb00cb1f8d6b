"""L-BFGS over a batch of independent problems at once, in one jitted `lax.while_loop`.

Every lane (one start) is its own minimisation with its own history, line search and stopping
test. Lanes are served as a work queue: each tick evaluates one line-search trial for each of the
first `width` still-active lanes, and a lane whose search ends takes its L-BFGS step and starts
the next search in the same tick, so no lane waits for another's search and converged lanes cost
nothing. Stopping rules follow scipy's L-BFGS-B defaults (gradient max-norm `gtol`, relative
decrease `ftol`), so results compare with `scipy.optimize.minimize(method="L-BFGS-B")`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Result(NamedTuple):
    """Per-lane outcome: x [S, P], value [S], grad [S, P], iterations [S] int."""

    x: jax.Array
    value: jax.Array
    grad: jax.Array
    iterations: jax.Array


class _Lanes(NamedTuple):
    x: jax.Array  # [S, P] current iterate, its value f [S] and gradient g [S, P]
    f: jax.Array
    g: jax.Array
    s_hist: jax.Array  # [S, M, P] steps, newest first
    y_hist: jax.Array  # [S, M, P] gradient changes
    rho: jax.Array  # [S, M] 1 / (s . y); 0 marks an empty slot
    d: jax.Array  # [S, P] search direction
    t: jax.Array  # [S] next trial step; lo, hi [S] bracket; trials [S] int in this search
    lo: jax.Array
    hi: jax.Array
    trials: jax.Array
    x_best: jax.Array  # [S, P] last trial meeting Armijo's condition, its f and g
    f_best: jax.Array
    g_best: jax.Array
    it: jax.Array  # [S] int, completed iterations
    active: jax.Array  # [S] bool


def _direction(g, s_hist, y_hist, rho):
    """Two-loop recursion: -H g per lane [W, P]; steepest descent of unit length without history."""
    alphas, q = [], g
    for i in range(s_hist.shape[1]):
        a = rho[:, i] * jnp.sum(s_hist[:, i] * q, -1)
        q = q - a[:, None] * y_hist[:, i]
        alphas.append(a)
    have = rho[:, 0] > 0
    yy = jnp.where(have, jnp.sum(y_hist[:, 0] ** 2, -1), 1.0)
    r = jnp.where(have, jnp.sum(s_hist[:, 0] * y_hist[:, 0], -1) / yy, 1.0)[:, None] * q
    for i in reversed(range(s_hist.shape[1])):
        b = rho[:, i] * jnp.sum(y_hist[:, i] * r, -1)
        r = r + (alphas[i] - b)[:, None] * s_hist[:, i]
    unit = -g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-300)
    d = jnp.where(have[:, None], -r, unit)
    # A non-descent direction (possible after skipped updates) falls back to steepest descent.
    return jnp.where((jnp.sum(d * g, -1) < 0)[:, None], d, unit)


def _new_search(lanes: _Lanes, start) -> _Lanes:
    """Resets the line search (from t = 1 along a fresh direction) where `start` [W] is set."""
    w = lambda new, old: jnp.where(start.reshape(start.shape + (1,) * (old.ndim - 1)), new, old)
    d = _direction(lanes.g, lanes.s_hist, lanes.y_hist, lanes.rho)
    return lanes._replace(
        d=w(d, lanes.d),
        t=w(1.0, lanes.t),
        lo=w(0.0, lanes.lo),
        hi=w(jnp.inf, lanes.hi),
        trials=w(0, lanes.trials),
        x_best=w(lanes.x, lanes.x_best),
        f_best=w(lanes.f, lanes.f_best),
        g_best=w(lanes.g, lanes.g_best),
    )


def _tick(value_and_grad, ln: _Lanes, c1, c2, max_line_steps, gtol, ftol, max_iter) -> _Lanes:
    """One weak-Wolfe trial (doubling/bisection, Lewis-Overton) per active lane [W]; lanes whose
    search ends take the L-BFGS step, test convergence and start their next search."""
    slope = jnp.sum(ln.d * ln.g, -1)
    x_try = ln.x + ln.t[:, None] * ln.d
    f_try, g_try = value_and_grad(x_try)
    armijo = jnp.isfinite(f_try) & (f_try <= ln.f + c1 * ln.t * slope)
    curvature = jnp.sum(g_try * ln.d, -1) >= c2 * slope
    x_best = jnp.where(armijo[:, None], x_try, ln.x_best)
    f_best = jnp.where(armijo, f_try, ln.f_best)
    g_best = jnp.where(armijo[:, None], g_try, ln.g_best)
    lo = jnp.where(armijo, ln.t, ln.lo)
    hi = jnp.where(armijo, ln.hi, ln.t)
    trials = ln.trials + 1
    ended = ln.active & ((armijo & curvature) | (trials >= max_line_steps))
    moved = ended & (lo > 0)

    # The L-BFGS step for lanes whose search ended (others keep their iterate).
    x = jnp.where(moved[:, None], x_best, ln.x)
    f = jnp.where(moved, f_best, ln.f)
    g = jnp.where(moved[:, None], g_best, ln.g)
    sv, yv = x - ln.x, g - ln.g
    sy = jnp.sum(sv * yv, -1)
    push = moved & (sy > 2.2e-16 * jnp.sum(yv * yv, -1))  # scipy's curvature test for an update
    shift = lambda h, new: jnp.concatenate([new[:, None], h[:, :-1]], 1)
    s_hist = jnp.where(push[:, None, None], shift(ln.s_hist, sv), ln.s_hist)
    y_hist = jnp.where(push[:, None, None], shift(ln.y_hist, yv), ln.y_hist)
    rho = jnp.where(push[:, None], shift(ln.rho, 1.0 / jnp.where(push, sy, 1.0)), ln.rho)
    it = ln.it + ended
    small_step = (ln.f - f) <= ftol * jnp.maximum(jnp.maximum(jnp.abs(ln.f), jnp.abs(f)), 1.0)
    small_grad = jnp.max(jnp.abs(g), -1) <= gtol
    stop = ended & (~moved | small_step | small_grad | (it >= max_iter))
    t_next = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * lo)
    ln = _Lanes(
        x,
        f,
        g,
        s_hist,
        y_hist,
        rho,
        ln.d,
        t_next,
        lo,
        hi,
        trials,
        x_best,
        f_best,
        g_best,
        it,
        ln.active & ~stop,
    )
    return _new_search(ln, ended & ~stop)


def minimize(
    value_and_grad: Callable,
    x0: jax.Array,
    aux: Any = None,
    *,
    width: int = 256,
    max_iter: int = 1000,
    memory: int = 10,
    gtol: float = 1e-5,
    ftol: float = 2.220446049250313e-09,
    c1: float = 1e-4,
    c2: float = 0.9,
    max_line_steps: int = 30,
) -> Result:
    """Minimises S independent problems from starts `x0` [S, P].

    `value_and_grad(x [W, P], aux) -> (f [W], g [W, P])` gives each lane's objective and its
    gradient; lanes must not interact. `aux` is a pytree of per-lane data with leading axis S
    (e.g. bootstrap weights [S, n]), or None. A lane stops when max|g| <= gtol, when its decrease
    f_k - f_k+1 <= ftol * max(|f_k|, |f_k+1|, 1), when its line search finds no decrease, or after
    `max_iter` iterations. Jit-compatible; `width` lanes are evaluated together.
    """
    s, p = x0.shape
    width = min(width, s)
    f0, g0 = value_and_grad(x0, aux)
    hist = jnp.zeros((s, memory, p), x0.dtype)
    scalar = jnp.zeros(s, x0.dtype)
    count = jnp.zeros(s, jnp.int32)
    lanes = _Lanes(
        x0,
        f0,
        g0,
        hist,
        hist,
        jnp.zeros((s, memory), x0.dtype),
        x0,
        scalar,
        scalar,
        scalar,
        count,
        x0,
        f0,
        g0,
        count,
        jnp.isfinite(f0) & (jnp.max(jnp.abs(g0), -1) > gtol),
    )
    lanes = _new_search(lanes, lanes.active)

    def body(all_lanes: _Lanes) -> _Lanes:
        idx = jnp.nonzero(all_lanes.active, size=width, fill_value=s)[0]  # s marks an empty slot
        take = jnp.minimum(idx, s - 1)
        sub = jax.tree.map(lambda v: v[take], all_lanes)
        sub = sub._replace(active=sub.active & (idx < s))
        aux_w = jax.tree.map(lambda v: v[take], aux)
        sub = _tick(lambda x: value_and_grad(x, aux_w), sub, c1, c2, max_line_steps, gtol, ftol, max_iter)
        return jax.tree.map(lambda full, part: full.at[idx].set(part, mode="drop"), all_lanes, sub)

    lanes = jax.lax.while_loop(lambda ln: jnp.any(ln.active), body, lanes)
    return Result(lanes.x, lanes.f, lanes.g, lanes.it)
