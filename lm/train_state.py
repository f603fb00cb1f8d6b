"""The train state pytree, its sharded creation, and the generic jitted train step.

Every task supplies a `loss_fn(params, batch, rng) -> (loss_sum, aux)` where `aux` holds
`weight` (the number of tokens or examples the sum is over) and any other sums to report; the step
here turns it into one exact mean gradient over the whole global batch, accumulated over
microbatches with a `lax.scan` when `grad_accum > 1`. A step whose loss or gradient norm is not
finite changes nothing but the step counter and `skipped_steps`: no non-finite value ever enters
the parameters, the optimizer state or a checkpoint, and the host needs no sync to ensure it.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm import sharding


@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds: step (int32 scalar), params, opt_state, rng (base PRNG key), and
    skipped_steps (int32 scalar: steps whose update was dropped for a non-finite loss or gradient)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped_steps: jax.Array


def init_state(
    init_params: Callable,
    tx: optax.GradientTransformation,
    seed: int,
    mesh,
    rules,
    state_cls=TrainState,
    **extra,
):
    """Creates the state already sharded: shapes and logical axes from `jax.eval_shape`, then one
    `jax.jit(..., out_shardings=...)` so no full copy ever lives on one device.

    Args:
      init_params: `rng -> params` whose leaves are `nn.LogicallyPartitioned` (a Flax `init`).
      state_cls, extra: a TrainState subclass and its further fields (replicated arrays, e.g.
        PPO's adaptive KL coefficient).
    Returns:
      (state, state_shardings): the state and the NamedSharding tree matching it.
    """

    def boxed_state(rng):
        init_rng, train_rng = jax.random.split(rng)
        params = init_params(init_rng)
        return state_cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=train_rng,
            skipped_steps=jnp.zeros((), jnp.int32),
            **extra,
        )

    rng = jax.random.PRNGKey(seed)
    shardings = sharding.tree_shardings(jax.eval_shape(boxed_state, rng), mesh, rules)
    state = jax.jit(lambda r: nn.meta.unbox(boxed_state(r)), out_shardings=shardings)(rng)
    return state, shardings


def _microbatches(batch, grad_accum: int):
    """`[batch, ...]` -> `[grad_accum, batch // grad_accum, ...]`, microbatch j = rows j, j+k, ...

    Interleaving keeps every microbatch spread over all devices holding the batch.
    """

    def split(x):
        x = x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def summed_grads(loss_fn, params, batch, rng, grad_accum: int = 1):
    """`(loss_sum, aux, grads)` of `loss_fn(params, batch, rng) -> (loss_sum, aux)` over the batch,
    summed over `grad_accum` microbatches (a `lax.scan`; microbatch j gets `fold_in(rng, j)`)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss_sum, aux), grads = grad_fn(params, batch, rng)
        return loss_sum, aux, grads
    micro = _microbatches(batch, grad_accum)

    def accumulate(carry, xs):
        i, mb = xs
        (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

    (l0, a0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (l0, a0, g0))
    (loss_sum, aux, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
    return loss_sum, aux, grads


def guarded_update(tx, grads, loss, params, opt_state, step, nan_at_step: int = -1):
    """One optimizer update that happens only if `loss` and the gradient norm are finite.

    Args:
      step: the state's step, for the fault-injection hook `nan_at_step` (that step's gradients
        are NaN; -1: never).
    Returns:
      (params, opt_state, grad_norm, finite): the old params and opt_state when not finite, so no
      non-finite value ever enters them.
    """
    if nan_at_step >= 0:
        grads = jax.tree.map(lambda g: jnp.where(step == nan_at_step, jnp.nan, g), grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return keep_if_finite(new_params, params), keep_if_finite(new_opt_state, opt_state), grad_norm, finite


def minibatch_epochs(
    state,
    loss_fn,
    data,
    rng,
    *,
    tx,
    schedule,
    epochs: int,
    minibatches: int,
    grad_accum: int = 1,
    nan_at_step: int = -1,
):
    """The inner loop of PPO-style RL, one train step: `epochs` passes over `data` (a dict of
    `[rows, ...]` arrays, e.g. one rollout batch), each in `minibatches` shuffled minibatches, one
    `guarded_update` per minibatch over `grad_accum` microbatches (a mean of their means).

    Args:
      loss_fn: `(params, minibatch, rng) -> (loss, stats)`, a mean over the minibatch.
    Returns:
      (state with the new params and opt_state, step + 1, and skipped_steps + 1 if any update was
      not finite; metrics: loss_fn's stats and grad_norm averaged over the updates, learning_rate,
      skipped_steps).
    """
    rows = jax.tree.leaves(data)[0].shape[0]
    per = rows // minibatches

    def update(carry, index):
        params, opt_state, bad = carry
        mb = jax.tree.map(lambda x: x[index], data)
        loss, stats, grads = summed_grads(loss_fn, params, mb, rng, grad_accum)
        loss, stats, grads = jax.tree.map(lambda x: x / grad_accum, (loss, stats, grads))
        params, opt_state, grad_norm, finite = guarded_update(
            tx, grads, loss, params, opt_state, state.step, nan_at_step
        )
        return (params, opt_state, bad | ~finite), {**stats, "grad_norm": grad_norm}

    def epoch(carry, e):
        order = jax.random.permutation(jax.random.fold_in(rng, 1 + e), rows)[: per * minibatches]
        return jax.lax.scan(update, carry, order.reshape(minibatches, per))

    carry = (state.params, state.opt_state, jnp.zeros((), bool))
    (params, opt_state, bad), stats = jax.lax.scan(epoch, carry, jnp.arange(epochs))
    skipped = state.skipped_steps + bad.astype(jnp.int32)
    metrics = {k: jnp.mean(v) for k, v in stats.items()}
    metrics.update(learning_rate=schedule(state.step), skipped_steps=skipped)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=skipped)
    return state, metrics


def train_step(
    state: TrainState,
    batch,
    frozen=None,
    *,
    loss_fn,
    tx,
    schedule,
    grad_accum: int = 1,
    nan_at_step: int = -1,
):
    """One optimizer update on the global batch. Pure: `(state, batch[, frozen]) -> (state, metrics)`.

    Args:
      batch: dict of `[global_batch, ...]` arrays.
      frozen: parameters the loss reads but nothing updates (a LoRA base), or None.
      loss_fn: `(params, batch, rng) -> (loss_sum, aux)`, aux a dict with `weight` and other sums;
        with `frozen`, called as `loss_fn(params, batch, rng, frozen=frozen)`.
      nan_at_step: a fault-injection hook for tests: the gradients of this step are NaN.
    Returns:
      the new state and a flat dict of scalar metrics (loss, grad_norm, learning_rate,
      skipped_steps so far, and each aux sum divided by the total weight). A non-finite step keeps
      the old params and opt_state.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if frozen is not None:
        loss_fn = functools.partial(loss_fn, frozen=frozen)
    loss_sum, aux, grads = summed_grads(loss_fn, state.params, batch, rng, grad_accum)
    weight = jnp.maximum(aux["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    params, opt_state, grad_norm, finite = guarded_update(
        tx, grads, loss_sum, state.params, state.opt_state, state.step, nan_at_step
    )
    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    metrics = {k: v / weight for k, v in aux.items() if k != "weight"}
    metrics.update(
        loss=loss_sum / weight, grad_norm=grad_norm, learning_rate=schedule(state.step), skipped_steps=skipped
    )
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=skipped
    ), metrics


def jit_step(step, state_shardings, batch_shardings, frozen_shardings, mesh):
    """`step(state, batch[, frozen]) -> (state, metrics)` jitted once with explicit shardings
    (metrics replicated) and the state donated; without `frozen_shardings` it takes two arguments."""
    in_shardings = (state_shardings, batch_shardings)
    if frozen_shardings is not None:
        in_shardings += (frozen_shardings,)
    return jax.jit(
        step,
        in_shardings=in_shardings,
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_train_step(
    loss_fn,
    tx,
    schedule,
    grad_accum,
    state_shardings,
    batch_sharding,
    mesh,
    frozen_shardings=None,
    nan_at_step: int = -1,
):
    """`train_step` of `loss_fn` through `jit_step`: `(state, batch[, frozen]) -> (state, metrics)`."""
    step = functools.partial(
        train_step, loss_fn=loss_fn, tx=tx, schedule=schedule, grad_accum=grad_accum, nan_at_step=nan_at_step
    )
    return jit_step(step, state_shardings, batch_sharding, frozen_shardings, mesh)
