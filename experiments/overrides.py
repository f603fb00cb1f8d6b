"""Config files and key overrides: the one place that loads `path.py[:arg]` and sets dotted keys.

The runner, sweep members and tools/bench all go through these, so a key that is not in the
config is the same one-line error everywhere.
"""

import ast
import importlib.util
import os

from lm.errors import ConfigError


def load_module(path: str):
    """The config file at `path` as a module (its `get_config` and, for sweeps, `get_sweep`)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file {path!r}")
    spec = importlib.util.spec_from_file_location("_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec: str):
    """`path.py[:arg]` -> the ConfigDict its `get_config(arg)` returns."""
    path, _, arg = spec.partition(":")
    return load_module(path).get_config(arg or None)


def missing_key(config, key: str) -> bool:
    """Whether the dotted `key` ('train.steps') names no leaf or section of `config`."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return True
        node = node[part]
    return False


def set_key(config, key: str, value, source: str) -> None:
    """Sets the dotted `key` of a (locked) config to `value`; ConfigError naming `source` when the
    key does not exist or the value does not fit its type."""
    if missing_key(config, key):
        raise ConfigError(f"{source}: unknown config key config.{key}")
    *sections, name = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    try:
        node[name] = value
    except TypeError as e:
        raise ConfigError(f"{source}: config.{key}={value!r}: {e}") from None


def apply(config, overrides: dict, source: str) -> None:
    """`set_key` for each item of `overrides` ({'optimizer.lr': 3e-4, ...}), in order."""
    for key, value in overrides.items():
        set_key(config, key, value, source)


def parse(item: str, config) -> tuple[str, object]:
    """`--config.a.b=TEXT` (or `config.a.b=TEXT`) -> ('a.b', TEXT as the type of the key's current
    value: bools from 1/true/yes, tuples and lists as Python literals)."""
    key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
    if not sep or missing_key(config, key):
        raise ConfigError(f"--config.{key}: no such config key (expected --config.SECTION.KEY=VALUE)")
    old = config
    for part in key.split("."):
        old = old[part]
    if isinstance(old, bool):
        return key, text.lower() in ("1", "true", "yes")
    if isinstance(old, (tuple, list)):
        return key, type(old)(ast.literal_eval(text))
    return key, type(old)(text)


def first_unknown(argv: list[str], config) -> str:
    """The message for the first `--config.a.b=...` of `argv` naming a key `config` does not have."""
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if missing_key(config, key):
                task = config.get("task")
                return f"unknown config key config.{key} ({arg}): config.task={task!r} does not read it"
    return "unknown config key"
