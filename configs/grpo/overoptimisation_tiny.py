"""Reward over-optimisation (Gao et al. 2022) with GRPO, beside configs/ppo/overoptimisation_tiny.py:
no KL penalty against a reward model trained on few comparisons; the grader (the gold reward) is
logged beside the proxy.

  python -m experiments.run --config configs/grpo/overoptimisation_tiny.py --workdir runs/grpo_nokl \
      --config.init_from=runs/recipe/sft --config.grpo.reward_from=runs/rm_few
  python -m tools.plot_rlhf overoptimisation runs/grpo_nokl --out docs/rlhf/overoptimisation_grpo.png

(runs/rm_few as in the PPO config's docstring.) Every logged step has rm_score (the proxy),
oracle_score (the gold) and kl, for the plot against sqrt(KL).
"""

from configs.grpo import tasks_tiny


def get_config(arg=None):
    c = tasks_tiny.get_config(arg)
    c.grpo.kl_coef = 0.0
    c.optimizer.lr = 2e-4
    c.train.log_every = 2
    return c
