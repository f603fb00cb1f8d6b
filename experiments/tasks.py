"""The registry of tasks: `config.task` -> the module that runs it.

Each module has `validate(config)` (one ConfigError naming the first bad key, before anything is
written), `run(config, workdir)`, and optionally `preview(config) -> dict` (what `--print_config`
can resolve without preparing data). Modules are imported only when their task is asked for.
"""

import importlib

TASKS = {
    "pretrain": "lm.tasks.pretrain",
    "mlm": "lm.tasks.mlm",
    "finetune": "lm.tasks.finetune",
    "sft": "lm.tasks.sft",
    "reward": "lm.tasks.reward",
    "ppo": "lm.tasks.ppo",
    "grpo": "lm.tasks.grpo",
    "dpo": "lm.tasks.dpo",
    "recipe": "experiments.recipe",
}

# What to try after a run of each task ({workdir}: the run's).
NEXT = {
    "pretrain": "python -m tools.sample --workdir {workdir} --prompt 'def '   (then SFT: python -m "
    "experiments.run --config configs/sft/tasks_tiny.py --config.init_from={workdir} --workdir DIR)",
    "mlm": "fine-tune it: python -m experiments.run --config configs/finetune/tagging.py "
    "--config.init_from={workdir} --workdir DIR",
    "finetune": "",
    "sft": "python -m tools.sample --workdir {workdir} --chat --prompt '...'   (then a reward model: "
    "configs/reward/tasks_tiny.py with --config.init_from={workdir})",
    "reward": "PPO: python -m experiments.run --config configs/ppo/tasks_tiny.py --config.init_from=SFT_DIR "
    "--config.ppo.reward_from={workdir} --workdir DIR",
    "ppo": "python -m tools.sample --workdir {workdir} --chat --prompt '...'",
    "grpo": "python -m tools.sample --workdir {workdir} --chat --prompt '...'",
    "dpo": "python -m tools.sample --workdir {workdir} --chat --prompt '...'",
    "recipe": "open {workdir}/report.md",
}
# An NNLM (config.model.kind='nnlm') is pretrained only: no later stage starts from it.
NEXT_NNLM = "python -m tools.sample --workdir {workdir} --prompt 'def '"


def next_command(config, workdir: str) -> str:
    """What to try after `config`'s run in `workdir`."""
    if config.task == "pretrain" and config.model.get("kind") == "nnlm":
        return NEXT_NNLM.format(workdir=workdir)
    return NEXT.get(config.task, "").format(workdir=workdir)


def module(task: str):
    """The module that runs `task` (a key of TASKS)."""
    return importlib.import_module(TASKS[task])
