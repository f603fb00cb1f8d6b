"""DPO of the tiny SFT policy on the tiny reward model's comparisons (graded tasks), minutes on 2 CPU cores.

  python -m experiments.run --config configs/dpo/tasks_tiny.py --workdir runs/dpo_tiny \
      --config.init_from=runs/sft_tiny --config.dpo.comparisons_from=runs/rm_tiny
"""

from configs import common
from configs.reward import tasks_tiny as reward_config


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.dpo_config()
    c.data.tasks = reward_config.RL_TASKS
    c.dpo.beta = 0.1
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_fraction = 0.1
    c.train.steps = 100
    c.train.global_batch_size = 16  # prompts, each with its K ranked responses
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 25
    c.train.eval_batches = 8
    c.train.checkpoint_every = 25
    c.dpo.eval_prompts = 200
    if a.smoke:
        c.data.tasks = "add,reverse"
        c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 4, 2, 2, 1
        c.train.global_batch_size, c.train.seq_len, c.train.eval_batches = 8, 64, 1
        c.dpo.eval_prompts, c.dpo.max_new_tokens = 8, 8
    return c
