"""The runner: `python -m experiments.run --config configs/<file>.py[:arg] [--config.key=value] --workdir DIR`.

Loads the config (keys locked: a mistyped override is an error), validates it once, joins the other
processes when there are several (`lm.distributed`), and dispatches on `config.task`. User mistakes
print one line and exit 2; bugs keep their tracebacks; a run stopped by SIGTERM checkpoints and
exits 75.
"""
import copy
import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import sweep
from lm import distributed, flops, lora
from lm.errors import ConfigError, Preempted, UserError
from lm.tasks.pretrain import model_config

EX_TEMPFAIL = 75  # sysexits.h: a preempted run; launchers requeue it


def define_flags() -> flags.FlagValues:
    """A fresh set of the runner's flags: each `main(argv)` parses into its own, so the runner can
    be called in-process again and again (config_flags defines one flag per override it meets)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", flag_values=fv,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.", flag_values=fv)
    flags.DEFINE_string("member", None, "Run only this member of the config's sweep (the sweep runner sets it).",
                        flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "Sweeps: members run at once.", flag_values=fv)
    flags.DEFINE_string("launcher", "local", "Sweeps: local | slurm | submitit-local.", flag_values=fv)
    flags.DEFINE_string("slurm_partition", None, "Sweeps on SLURM: the partition.", flag_values=fv)
    flags.DEFINE_integer("slurm_timeout_min", 240, "Sweeps on SLURM: each member's time limit.", flag_values=fv)
    flags.DEFINE_integer("slurm_gpus_per_node", 0, "Sweeps on SLURM: GPUs per member.", flag_values=fv)
    flags.DEFINE_string("coordinator_address", None, "Several processes: host:port of process 0 (default: "
                        "$JAX_COORDINATOR_ADDRESS, or a cluster manager's).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Several processes: how many (default: $JAX_NUM_PROCESSES).",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Several processes: this one's index (default: $JAX_PROCESS_ID).",
                         flag_values=fv)
    flags.DEFINE_integer("slurm_cpus_per_task", 0, "Sweeps on SLURM: CPUs per member (0: the cluster's default).",
                         flag_values=fv)
    return fv


FLAGS = define_flags()


def _pretrain(config, workdir):
    from lm.tasks import pretrain
    return pretrain.run(config, workdir)


def _sft(config, workdir):
    from lm.tasks import sft
    return sft.run(config, workdir)


def _reward(config, workdir):
    from lm.tasks import reward
    return reward.run(config, workdir)


def _ppo(config, workdir):
    from lm.tasks import ppo
    return ppo.run(config, workdir)


def _dpo(config, workdir):
    from lm.tasks import dpo
    return dpo.run(config, workdir)


def _recipe(config, workdir):
    from experiments import recipe
    return recipe.run(config, workdir)


TASKS = {"pretrain": _pretrain, "sft": _sft, "reward": _reward, "ppo": _ppo, "dpo": _dpo, "recipe": _recipe}


def _positive(config, *keys):
    for key in keys:
        section, name = key.split(".")
        if config[section][name] <= 0:
            raise ConfigError(f"config.{key}={config[section][name]} must be positive")


def validate(config) -> None:
    """Checks values the types alone cannot: one ConfigError naming the first bad key."""
    if config.task not in TASKS:
        raise ConfigError(f"config.task={config.task!r}: expected one of {sorted(TASKS)}")
    _positive(config, "train.steps", "train.global_batch_size", "train.seq_len", "train.grad_accum",
              "train.log_every", "train.checkpoint_every", "train.keep_checkpoints")
    t = config.train
    if t.seq_len > config.model.max_seq_len:
        raise ConfigError(f"config.train.seq_len={t.seq_len} exceeds config.model.max_seq_len="
                          f"{config.model.max_seq_len}")
    if config.scaling.flops not in flops.FLOPS_METHODS:
        raise ConfigError(f"config.scaling.flops={config.scaling.flops!r}: expected one of {flops.FLOPS_METHODS}")
    if config.scaling.budget < 0:
        raise ConfigError(f"config.scaling.budget={config.scaling.budget} must be >= 0 (0: train.steps as set)")
    if not 0 <= config.schedule.warmup_fraction < 1:
        raise ConfigError(f"config.schedule.warmup_fraction={config.schedule.warmup_fraction} must be in [0, 1)")
    model_config(config, vocab_size=1)  # the model's and LoRA's own checks, before any data is prepared
    lora.from_config(config.lora)
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config.train.on_nonfinite={t.on_nonfinite!r}: expected 'stop' or 'skip'")
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(f"config.train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"config.train.grad_accum={t.grad_accum}")


def prepare_workdir(workdir: str) -> str:
    """Creates the workdir and checks it is writable; returns its absolute path."""
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


def _unknown_override(argv, config) -> str:
    """The first `--config.a.b=...` override naming a key the config does not have."""
    for arg in argv:
        if arg.startswith("--config."):
            path = arg[len("--config."):].split("=", 1)[0]
            node = config
            for part in path.split("."):
                if not hasattr(node, "keys") or part not in node:
                    return f"unknown config key config.{path} ({arg})"
                node = node[part]
    return "unknown config key"


def parse_flags(argv):
    """Parses the command line; raises ConfigError with one line for any mistake in it."""
    config_arg = _config_arg(argv)
    path = config_arg and config_arg.split(":", 1)[0]
    if path is None or not any(a.startswith("--workdir") for a in argv):
        raise ConfigError("--config and --workdir are required")
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
        raise ConfigError(_unknown_override(argv, FLAGS["config"].value)) from None
    finally:
        sys.argv = saved_argv
    return FLAGS.config, FLAGS.workdir


def _select_member(members, name: str):
    for member in members or []:
        if member.name == name:
            return member
    known = ", ".join(m.name for m in (members or [])[:3])
    raise ConfigError(f"--member={name!r}: the config declares no such sweep member"
                      + (f" (e.g. {known})" if known else " (it has no get_sweep)"))


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
    """Validates every member's config, then runs the sweep; exit 0 when every member completed."""
    for member in members:
        member_config = copy.deepcopy(config)
        sweep.apply_overrides(member_config, member.overrides, f"sweep member {member.name}")
        validate(member_config)
    config_arg = _config_arg(argv)
    passthrough = [a for a in argv[1:] if a.startswith("--config.")]
    counts = sweep.run_sweep(members, config_arg=config_arg, passthrough=passthrough, sweep_dir=workdir,
                             launcher=FLAGS.launcher, parallel=FLAGS.parallel, slurm=_slurm_parameters())
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    print(f"sweep: {summary}; results in {os.path.join(workdir, 'results.csv')}")
    return 0 if counts.get("completed", 0) == len(members) else 1


def main(argv) -> int:
    try:
        config, workdir = parse_flags(argv)
        config_arg = _config_arg(argv)
        members = sweep.load_sweep(config_arg.split(":", 1)[0], _arg_of(config_arg))
        if members and FLAGS.member is None:
            return run_sweep(config, members, argv, prepare_workdir(workdir))
        if FLAGS.member is not None:
            member = _select_member(members, FLAGS.member)
            sweep.apply_overrides(config, member.overrides, f"sweep member {member.name}")
        validate(config)
        workdir = prepare_workdir(workdir)
        distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        TASKS[config.task](config, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"preempted at step {e.step}; checkpoint saved, resume by running the same command",
              file=sys.stderr)
        return EX_TEMPFAIL
    return 0


def _arg_of(config_arg: str) -> str | None:
    return config_arg.split(":", 1)[1] if ":" in config_arg else None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
