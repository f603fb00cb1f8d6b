"""Logical axis names, the mesh built from the config, and sharding helpers.

Parameters carry logical axis names (the constants below) via `nn.with_logical_partitioning`;
activations are constrained at block boundaries with `nn.with_logical_constraint`. A rules table
in the config maps each logical name to mesh axes ('data', 'fsdp', 'tensor').
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.errors import ConfigError

# Logical axis names used by the model. Parameter axes:
EMBED = "embed"  # model width of weights: sharded over fsdp
MLP = "mlp"  # MLP hidden: sharded over tensor
HEADS = "heads"  # attention query heads: sharded over tensor
KV_HEADS = "kv_heads"  # attention key/value heads: sharded over tensor
HEAD_DIM = "head_dim"  # per-head width: replicated
VOCAB = "vocab"  # vocabulary: sharded over tensor
POSITIONS = "positions"  # learned position table rows: replicated
LAYERS = "layers"  # stacked layers (scan): replicated
# Activation axes:
BATCH = "batch"  # batch: sharded over data and fsdp
LENGTH = "length"  # sequence: replicated
ACT_EMBED = "act_embed"  # model width of activations: replicated

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Resolves the config's axis sizes (one may be -1: the devices left over) to a full shape.

    Raises ConfigError when the sizes do not multiply to `num_devices`.
    """
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
    if bad or len(free) > 1:
        raise ConfigError(f"config.mesh: axis sizes must be positive with at most one -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config.mesh={sizes} does not fit {num_devices} devices: "
                f"{fixed} does not divide {num_devices}"
            )
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"config.mesh={sizes} needs {math.prod(sizes.values())} devices, this run has {num_devices}"
        )
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh over all devices (or `devices`)."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape([shape[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def axis_rules(rules_cfg) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """The config's logical-axis rules as the tuple-of-pairs Flax expects."""
    return tuple(
        (str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules_cfg
    )


def tree_shardings(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (e.g. from jax.eval_shape)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of `[batch, seq]` arrays: batch split over the axes the rules give 'batch'."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes((BATCH, LENGTH), rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that puts a full copy on every device (scalars, RNG keys, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows `[local_batch, seq]` into global sharded arrays `[batch, seq]`."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def process_slice(
    global_size: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The one per-process batch slice: this process' contiguous part of `global_size` rows (the
    rows `global_batch` expects from it); index and count default to this process' own."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_size % count:
        raise ValueError(f"a batch of {global_size} rows is not divisible by {count} processes")
    local = global_size // count
    return slice(index * local, (index + 1) * local)


def vector_sharding(batch_sharding_: NamedSharding) -> NamedSharding:
    """Sharding of `[batch]` arrays split like the batch axis of `batch_sharding_`."""
    return NamedSharding(batch_sharding_.mesh, PartitionSpec(batch_sharding_.spec[0]))


def unboxed(tree):
    """The values of a tree of `nn.LogicallyPartitioned` boxes (e.g. an abstract `eval_shape` of
    `init`), without a sharding constraint: usable outside jit on shapes alone."""
    return jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )
