"""Several processes through JAX's own runtime (`jax.distributed`), and what they must share.

A run is multi-process when the runner is given a coordinator (flags, or the `JAX_COORDINATOR_ADDRESS`,
`JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` variables that `tools.launch_local` sets), or when it starts
under a cluster manager JAX detects by itself (SLURM with more than one task, Open MPI, a TPU pod
slice). CPU processes exchange collectives through gloo.
"""

import os

import jax

from lm.errors import ConfigError

# Variables a cluster manager sets when it starts several tasks of one job.
_CLUSTER_SIZES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


def under_cluster_manager() -> bool:
    """Whether a cluster manager started this process as one of several tasks (or a TPU pod host)."""
    if any((_int_env(name) or 1) > 1 for name in _CLUSTER_SIZES):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins the job's processes when there are several; returns whether it did.

    Arguments left None are read from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; with none of them set, JAX's own cluster detection decides (SLURM, Open MPI,
    TPU pods). Must run before anything touches a JAX device.
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _int_env("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("JAX_PROCESS_ID")
    explicit = (coordinator_address, num_processes, process_id)
    if all(x is None for x in explicit):
        if not under_cluster_manager():
            return False
    elif any(x is None for x in explicit):
        raise ConfigError(
            "--coordinator_address, --num_processes and --process_id go together "
            f"(given: {coordinator_address!r}, {num_processes!r}, {process_id!r})"
        )
    elif not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
