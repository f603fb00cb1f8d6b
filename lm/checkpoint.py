"""Checkpoints through orbax: workdir/checkpoints/<step>/{state, meta}.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact; the manager keeps the last K.
"""
import os

import jax
import orbax.checkpoint as ocp

from lm.errors import CheckpointError


def manager(workdir: str, keep: int = 2) -> ocp.CheckpointManager:
    """A CheckpointManager over workdir/checkpoints keeping the newest `keep` checkpoints."""
    # cleanup_tmp_directories: a save cut short by a kill leaves a tmp dir that would break the
    # next save of the same step.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1, create=True,
                                           cleanup_tmp_directories=True,
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


def _state_dir(path: str) -> str:
    """The `state` item directory of a workdir, its checkpoints/ dir, or one step's directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.join(path, "state")
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    if not steps:
        raise CheckpointError(f"no checkpoint found at {path}")
    return os.path.join(root, str(max(steps)), "state")


def restore_params(path: str, abstract_params):
    """Restores only the parameters of a saved train state, into `abstract_params`' shapes/shardings.

    Args:
      path: a workdir, its checkpoints/ directory, or one step's directory (newest step is taken).
      abstract_params: pytree of `jax.ShapeDtypeStruct` (with `.sharding`) shaped like the params.
    """
    directory = _state_dir(path)
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract_params)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args={"params": restore_args},
                partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"cannot restore parameters from {directory}: {str(e).splitlines()[0]}") from None
    return restored["params"]
