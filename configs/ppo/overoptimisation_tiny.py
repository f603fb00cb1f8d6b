"""Reward over-optimisation (Gao et al. 2022) on the graded tasks: PPO with no KL penalty against a
reward model trained on few comparisons; the grader (the gold reward) is logged beside the proxy.

  python -m experiments.run --config configs/reward/tasks_tiny.py --workdir runs/rm_few \
      --config.init_from=runs/recipe/sft --config.reward.num_prompts=150 --config.train.steps=60
  python -m experiments.run --config configs/ppo/overoptimisation_tiny.py --workdir runs/ppo_nokl \
      --config.init_from=runs/recipe/sft --config.ppo.reward_from=runs/rm_few
  python -m tools.plot_rlhf overoptimisation runs/ppo_nokl --out docs/rlhf/overoptimisation.png

Every logged step has rm_score (the proxy), oracle_score (the gold) and kl, for the plot against
sqrt(KL). The learning rate is high enough to travel several nats in 60 iterations.
"""

from configs.ppo import tasks_tiny


def get_config(arg=None):
    c = tasks_tiny.get_config(arg)
    c.ppo.kl_coef = 0.0
    c.optimizer.lr = 2e-4
    c.train.log_every = 2
    return c
