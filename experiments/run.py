"""The runner: `python -m experiments.run --config configs/<file>.py[:arg] [--config.key=value] --workdir DIR`.

Loads the config (keys locked: a mistyped override is an error), validates it once, and dispatches
on `config.task`. User mistakes print one line and exit 2; bugs keep their tracebacks.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

from lm.errors import ConfigError, UserError

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':arg'.", flag_values=FLAGS,
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.", flag_values=FLAGS)


def _pretrain(config, workdir):
    from lm.tasks import pretrain
    return pretrain.run(config, workdir)


TASKS = {"pretrain": _pretrain}


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


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
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
    path = _config_path(argv)
    if path is None or not any(a.startswith("--workdir") for a in argv):
        raise ConfigError("--config and --workdir are required")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    try:
        FLAGS(argv)
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = f" ({lines[-1]})" if len(lines) > 1 else ""
        raise ConfigError(f"{lines[0]}{cause}") from None
    except (AttributeError, KeyError):  # config_flags' way of saying an override names no key
        raise ConfigError(_unknown_override(argv, FLAGS["config"].value)) from None
    return FLAGS.config, FLAGS.workdir


def main(argv) -> int:
    try:
        config, workdir = parse_flags(argv)
        validate(config)
        workdir = prepare_workdir(workdir)
        TASKS[config.task](config, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
