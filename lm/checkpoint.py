"""Checkpoints through orbax: workdir/checkpoints/<step>/{state, meta}.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints intact; the manager keeps the last K.
"""

import json
import os
import sys
import time

import jax
import orbax.checkpoint as ocp

from lm.errors import CheckpointError


def manager(workdir: str, keep: int = 2, subdir: str = "checkpoints") -> ocp.CheckpointManager:
    """A CheckpointManager over workdir/<subdir> keeping the newest `keep` checkpoints."""
    # cleanup_tmp_directories: a save cut short by a kill leaves a tmp dir that would break the
    # next save of the same step.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=1,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, subdir)), options=options, item_names=("state", "meta")
    )


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Saves `state` (any pytree of arrays) and `meta` (JSON: config, data info) at `step`."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()


# What orbax and tensorstore raise for a checkpoint they cannot read or fit into the target: a
# truncated or missing array file (a bare Exception whose cause is a ValueError), a cut
# _METADATA or _sharding (JSONDecodeError, ValueError), a missing metadata file
# (FileNotFoundError), a missing item (KeyError), a shape or tree mismatch (ValueError, KeyError).
_READ_ERRORS = (ValueError, KeyError, OSError)


def _read_error(error: Exception) -> Exception | None:
    """The read error behind `error` (itself or its cause), or None when it is something else."""
    for e in (error, error.__cause__):
        if isinstance(e, _READ_ERRORS):
            return e
    return None


def _path_name(path) -> str:
    """A pytree key path as 'a/b/0/c', the same for a dataclass or namedtuple and the dicts orbax saves."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _shapes(tree) -> dict:
    """{path name: shape} of a pytree of arrays, abstract arrays or orbax ArrayMetadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def saved_shapes(state_dir: str) -> dict:
    """{path name: shape} of the arrays saved in a checkpoint's `state` item (from its metadata)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(state_dir).item_metadata
    return _shapes(metadata.tree if hasattr(metadata, "tree") else metadata)


def mismatch(saved: dict, wanted: dict) -> str | None:
    """The first difference between saved and wanted {path: shape}, parameters first, or None."""
    for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params"), p)):
        if path not in saved:
            return f"{path} is not in the checkpoint"
        if path not in wanted:
            return f"the checkpoint has {path}, which this config's state has not"
        if saved[path] != wanted[path]:
            return f"{path} has shape {saved[path]} in the checkpoint, {wanted[path]} in this config"
    return None


def _restore_step(mngr: ocp.CheckpointManager, abstract_state, step: int):
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return mngr.restore(step, args=args).state


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restores the state at `step` (default: the newest readable) into the shardings of `abstract_state`.

    Without `step`, checkpoints are tried newest first: unreadable ones (truncated or missing
    files, e.g. from a full disk) are moved aside to `<step>.unreadable-<ns>` (training saves those
    steps again; a read that failed for a passing reason loses nothing), with one warning line on
    stderr. None readable is a CheckpointError. A readable checkpoint whose arrays differ from this
    config's (another model size, another state layout) is a CheckpointError naming the first
    differing parameter, and nothing is moved.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding` set (the target layout).
    Returns:
      (step, state), or (None, None) when there is no checkpoint.
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        return None, None
    bad = []
    wanted = _shapes(abstract_state)
    for candidate in steps:
        try:
            saved = saved_shapes(os.path.join(os.fspath(mngr.directory), str(candidate), "state"))
        except Exception:  # no readable array metadata: the restore below fails and says how
            saved = None
        different = bool(saved) and mismatch(saved, wanted)
        if different:
            raise CheckpointError(
                f"checkpoint {candidate} in {mngr.directory} does not fit this config: {different}"
            )
        try:
            state = _restore_step(mngr, abstract_state, candidate)
        except Exception as e:
            cause = _read_error(e)
            if cause is None:
                raise
            bad.append((candidate, (str(cause).splitlines() or [type(cause).__name__])[0]))
            continue
        if bad:
            names = ", ".join(str(s) for s, _ in bad)
            print(
                f"warning: checkpoint {names} in {mngr.directory} unreadable ({bad[0][1][:200]}); "
                f"moved aside, resuming from step {candidate}",
                file=sys.stderr,
            )
            for s, _ in bad:
                path = os.path.join(os.fspath(mngr.directory), str(s))
                os.replace(path, f"{path}.unreadable-{time.time_ns()}")
            mngr.reload()
        return candidate, state
    raise CheckpointError(
        f"no readable checkpoint in {mngr.directory} that matches this config "
        f"(step {bad[0][0]}: {bad[0][1][:300]})"
    )


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The JSON `meta` item saved with the checkpoint at `step`."""
    return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


def abstract_like(state, shardings):
    """`jax.ShapeDtypeStruct`s with shardings: the restore target for a state shaped like `state`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def latest_step_in(directory: str) -> int:
    """The newest step number among the checkpoint directories in `directory`."""
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    if not steps:
        raise CheckpointError(f"no checkpoint found in {directory}")
    return max(steps)


def _state_dir(path: str) -> str:
    """The `state` item directory of a workdir, its checkpoints/ dir, or one step's directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "state")):
        return os.path.join(path, "state")
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    return os.path.join(root, str(latest_step_in(root)), "state")


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
            restored = ckptr.restore(
                directory,
                args=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args={"params": restore_args},
                    partial_restore=True,
                ),
            )
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(
            f"cannot restore parameters from {directory}: {str(e).splitlines()[0]}"
        ) from None
    return restored["params"]


def read_run_config(run_dir: str) -> dict:
    """A workdir's config.json as the run used it: the user's keys with its "resolved" section
    (steps from a budget, an adopted architecture and template) applied; "run" kept as it is."""
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    for section, values in saved.pop("resolved", {}).items():
        if isinstance(values, dict) and isinstance(saved.get(section), dict):
            saved[section] = {**saved[section], **values}
        else:
            saved[section] = values
    return saved


def pretrained_run(path: str) -> tuple[str, dict]:
    """The run directory an `init_from` path belongs to, and the config saved there.

    Args:
      path: a workdir, its checkpoints/ directory, or one step's directory.
    Returns:
      (run directory holding config.json and its tokenizer file, that config as `read_run_config`).
    """
    start = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(start):
        raise CheckpointError(f"config.init_from={path!r}: no such file or directory")
    here = start
    for _ in range(3):
        if os.path.isfile(os.path.join(here, "config.json")) and os.path.exists(
            os.path.join(here, "tokenizer")
        ):
            return here, read_run_config(here)
        here = os.path.dirname(here)
    raise CheckpointError(
        f"config.init_from={path!r}: not a training workdir or a checkpoint inside one "
        f"(no config.json and tokenizer at it or above it)"
    )


def policy_checkpoint(init_from: str, run_dir: str) -> str:
    """Where a later stage's starting parameters are: run_dir/best/ when init_from names the run
    and it kept a best checkpoint (SFT does), else init_from itself."""
    best = os.path.join(run_dir, "best")
    named_run = os.path.abspath(os.path.expanduser(init_from)) == run_dir
    if named_run and os.path.isdir(best) and any(d.isdigit() for d in os.listdir(best)):
        return best
    return init_from
