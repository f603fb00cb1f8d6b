"""The whole InstructGPT recipe on the graded tasks, on 2 CPU cores.

  python -m experiments.run --config configs/recipe/instructgpt_tiny.py --workdir runs/recipe

pretrain (configs/pretrain/tiny.py) -> SFT (configs/sft/tasks_tiny.py, exactly: its best-eval
checkpoint) -> reward model -> PPO, with DPO beside PPO and best-of-n at report time; each stage in
DIR/<stage>/, skipped once completed. Ends with DIR/report.md and DIR/report.json.
"""

from configs import common
from configs.reward import tasks_tiny as reward_config


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.recipe_config()
    c.recipe.source = "graded_tasks"  # the report's prompts and judges: the oracle and the reward model
    suffix, oracle = (":smoke", ":oracle,smoke") if a.smoke else ("", ":oracle")
    c.recipe.pretrain = "configs/pretrain/tiny.py" + suffix  # '' skips a stage
    c.recipe.sft = "configs/sft/tasks_tiny.py" + suffix
    c.recipe.reward = "configs/reward/tasks_tiny.py" + suffix
    c.recipe.ppo = "configs/ppo/tasks_tiny.py" + suffix
    c.recipe.grpo = "configs/grpo/tasks_tiny.py" + suffix
    c.recipe.dpo = "configs/dpo/tasks_tiny.py" + suffix
    # Trained on the grader itself (the verifiable-reward rows).
    c.recipe.ppo_oracle = "configs/ppo/tasks_tiny.py" + oracle
    c.recipe.grpo_oracle = "configs/grpo/tasks_tiny.py" + oracle
    # The graded tasks of the RL stages and of the report (SFT trains on all four; see
    # configs/reward/tasks_tiny.py for why sort is left out).
    c.recipe.tasks = "add,reverse" if a.smoke else reward_config.RL_TASKS
    # Held-out test prompts of the report (1000 narrows the win-rate interval by 30% against 500).
    c.recipe.eval_prompts = 40 if a.smoke else 1000
    c.recipe.best_of_n = 4 if a.smoke else 16
    c.recipe.max_new_tokens = 8 if a.smoke else 32
    return c
