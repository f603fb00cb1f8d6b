"""The runner: `python -m experiments.run --config configs/<file>.py[:arg] [--config.key=value]
--workdir DIR`.

Loads the config (keys locked: a mistyped override, or a key the task does not read, is an error),
validates it once with its task's validator (`experiments.tasks`), joins the other processes when
there are several (`lm.distributed`), runs the task and ends with a summary. `--print_config` prints
the config as JSON and exits without creating the workdir; `--help` lists the flags. User mistakes
print one line and exit 2; bugs keep their tracebacks; a run stopped by SIGTERM checkpoints and
exits 75.
"""

import copy
import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from experiments import overrides, sweep, tasks
from lm import distributed, trainer
from lm.errors import ConfigError, Preempted, UserError
from lm.quiet import quiet_libraries
from tools import import_hf

USAGE = (
    "usage: python -m experiments.run --config configs/<file>.py[:arg] [--config.KEY=VALUE ...] "
    "--workdir DIR [--print_config] [--member NAME]"
)

EX_TEMPFAIL = 75  # sysexits.h: a preempted run; launchers requeue it


def define_flags() -> flags.FlagValues:
    """A fresh set of the runner's flags: each `main(argv)` parses into its own, so the runner can
    be called in-process again and again (config_flags defines one flag per override it meets)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally with ':arg'.", flag_values=fv, lock_config=True
    )
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.", flag_values=fv)
    flags.DEFINE_bool(
        "print_config",
        False,
        "Print the config as JSON (resolved as far as it can be without "
        "preparing data) and exit; nothing is written.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "member",
        None,
        "Run only this member of the config's sweep (the sweep runner sets it).",
        flag_values=fv,
    )
    flags.DEFINE_integer("parallel", 1, "Sweeps: members run at once.", flag_values=fv)
    flags.DEFINE_string("launcher", "local", "Sweeps: local | slurm | submitit-local.", flag_values=fv)
    flags.DEFINE_string("slurm_partition", None, "Sweeps on SLURM: the partition.", flag_values=fv)
    flags.DEFINE_integer(
        "slurm_timeout_min", 240, "Sweeps on SLURM: each member's time limit.", flag_values=fv
    )
    flags.DEFINE_integer("slurm_gpus_per_node", 0, "Sweeps on SLURM: GPUs per member.", flag_values=fv)
    flags.DEFINE_string(
        "coordinator_address",
        None,
        "Several processes: host:port of process 0 (default: "
        "$JAX_COORDINATOR_ADDRESS, or a cluster manager's).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes", None, "Several processes: how many (default: $JAX_NUM_PROCESSES).", flag_values=fv
    )
    flags.DEFINE_integer(
        "process_id", None, "Several processes: this one's index (default: $JAX_PROCESS_ID).", flag_values=fv
    )
    flags.DEFINE_integer(
        "slurm_cpus_per_task",
        0,
        "Sweeps on SLURM: CPUs per member (0: the cluster's default).",
        flag_values=fv,
    )
    return fv


FLAGS = define_flags()


def validate(config) -> None:
    """The task's own validation (its sections and the common ones): one ConfigError naming the
    first bad key. The same for a run, a sweep member and --print_config."""
    if config.get("task") not in tasks.TASKS:
        raise ConfigError(f"config.task={config.get('task')!r}: expected one of {sorted(tasks.TASKS)}")
    tasks.module(config.task).validate(config)


def print_config(config) -> None:
    """The config as JSON on stdout, with what its task can resolve without data under "resolved"."""
    module = tasks.module(config.task)
    resolved = module.preview(config) if hasattr(module, "preview") else {}
    print(json.dumps({**config.to_dict(), "resolved": resolved}, indent=2, sort_keys=True, default=str))


def prepare_workdir(workdir: str) -> str:
    """Creates the workdir and checks it is writable; returns its absolute path."""
    if "://" in workdir:
        raise ConfigError(f"--workdir {workdir}: expected a local or mounted path (e.g. gcsfuse), not a URL")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable: {e.strerror}") from None
    return workdir


def _config_arg(argv) -> str | None:
    """The `--config` value as given (file[:arg]), or None."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv):
    """Parses the command line; raises ConfigError with one line for any mistake in it."""
    config_arg = _config_arg(argv)
    path = config_arg and config_arg.split(":", 1)[0]
    if path is None or not any(a.startswith("--workdir") for a in argv):
        raise ConfigError(f"--config and --workdir are required ({USAGE[7:]}; --help lists every flag)")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    global FLAGS
    FLAGS = define_flags()
    saved_argv, sys.argv = sys.argv, list(argv)  # config_flags finds the override flags in sys.argv
    try:
        FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = f" ({lines[-1]})" if len(lines) > 1 else ""
        raise ConfigError(f"{lines[0]}{cause}") from None
    except (AttributeError, KeyError):  # config_flags' way of saying an override names no key
        raise ConfigError(overrides.first_unknown(argv, overrides.load_config(config_arg))) from None
    finally:
        sys.argv = saved_argv
    return FLAGS.config, FLAGS.workdir


def _select_member(members, name: str):
    for member in members or []:
        if member.name == name:
            return member
    known = ", ".join(m.name for m in (members or [])[:3])
    raise ConfigError(
        f"--member={name!r}: the config declares no such sweep member"
        + (f" (e.g. {known})" if known else " (it has no get_sweep)")
    )


def _slurm_parameters() -> dict:
    params = {"timeout_min": FLAGS.slurm_timeout_min}
    if FLAGS.slurm_partition:
        params["slurm_partition"] = FLAGS.slurm_partition
    if FLAGS.slurm_gpus_per_node:
        params["gpus_per_node"] = FLAGS.slurm_gpus_per_node
    if FLAGS.slurm_cpus_per_task:
        params["cpus_per_task"] = FLAGS.slurm_cpus_per_task
    return params


def run_sweep(config, members, argv, workdir: str) -> int:
    """Validates every member's config, then creates the sweep's workdir and runs it; exit 0 when
    every member completed."""
    for member in members:
        member_config = copy.deepcopy(config)
        overrides.apply(member_config, member.overrides, f"sweep member {member.name}")
        validate(member_config)
    workdir = prepare_workdir(workdir)
    config_arg = _config_arg(argv)
    passthrough = [a for a in argv[1:] if a.startswith("--config.")]
    counts = sweep.run_sweep(
        members,
        config_arg=config_arg,
        passthrough=passthrough,
        sweep_dir=workdir,
        launcher=FLAGS.launcher,
        parallel=FLAGS.parallel,
        slurm=_slurm_parameters(),
    )
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"sweep: {summary}; results in {os.path.join(workdir, 'results.csv')}")
    return 0 if counts.get("completed", 0) == len(members) else 1


def help_text() -> str:
    """The usage line and every flag with its help."""
    return f"{USAGE}\n\n{__doc__.strip()}\n\nflags:\n{define_flags().get_help()}\n"


def main(argv) -> int:
    if any(a in ("--help", "-h", "--helpfull") for a in argv[1:]):
        print(help_text())
        return 0
    quiet_libraries()
    try:
        config, workdir = parse_flags(argv)
        config_arg = _config_arg(argv)
        members = sweep.load_sweep(config_arg.split(":", 1)[0], _arg_of(config_arg))
        if FLAGS.member is not None:
            member = _select_member(members, FLAGS.member)
            overrides.apply(config, member.overrides, f"sweep member {member.name}")
        validate(config)
        if FLAGS.print_config:
            print_config(config)
            return 0
        if members and FLAGS.member is None:
            return run_sweep(config, members, argv, workdir)
        workdir = prepare_workdir(workdir)
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        if str(config.get("init_from", "")).startswith("hf:"):
            config.init_from = import_hf.resolve_init_from(config.init_from, workdir)
        start = time.time()
        tasks.module(config.task).run(config, workdir)
        if config.task != "recipe":
            print(
                trainer.summary(
                    workdir,
                    config.task,
                    time.time() - start,
                    tasks.next_command(config, workdir),
                )
            )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(
            f"preempted at step {e.step}; checkpoint saved, resume by running the same command",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    return 0


def _arg_of(config_arg: str) -> str | None:
    return config_arg.split(":", 1)[1] if ":" in config_arg else None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
