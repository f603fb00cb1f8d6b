"""Checkpoints through orbax: workdir/checkpoints/<step>/{state, meta}.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact; the manager keeps the last K.
"""
import os

import jax
import orbax.checkpoint as ocp

from lm.errors import CheckpointError


def manager(workdir: str, keep: int = 2, save_every: int = 1) -> ocp.CheckpointManager:
    """A CheckpointManager over workdir/checkpoints keeping the newest `keep` checkpoints."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Saves `state` (any pytree of arrays) and `meta` (JSON: config, data info) at `step`."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the state at `step` (default: the latest) into the shardings of `abstract_state`.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (the target layout).
    Returns:
      (step, state), or (None, None) when there is no checkpoint.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None, None
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {mngr.directory}/{step} does not match this config: "
                              f"{str(e).splitlines()[0]}") from None
    return step, restored.state


def abstract_like(state, shardings):
    """`jax.ShapeDtypeStruct`s with shardings: the restore target for a state shaped like `state`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
