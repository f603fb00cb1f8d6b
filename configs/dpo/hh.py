"""DPO of an HH SFT policy (configs/sft/hh.py) on an HH reward model's comparisons (configs/reward/hh.py):

  python -m experiments.run --config configs/dpo/hh.py --workdir runs/dpo_hh \
      --config.init_from=runs/sft_hh --config.dpo.comparisons_from=runs/rm_hh

The pairs are the reward run's (chosen vs rejected). No grader: best/ keeps the policy with the
best held-out comparison accuracy (eval_accuracy). The settings are the graded-task DPO's
(configs/dpo/tasks_tiny.py).
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.dpo_config()
    c.dpo.beta = 0.1
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_fraction = 0.1
    c.train.steps = 100
    c.train.global_batch_size = 16  # pairs
    c.train.seq_len = 256  # the reward run's
    c.train.log_every = 10
    c.train.eval_every = 25
    c.train.eval_batches = 16
    c.train.checkpoint_every = 25
    if a.smoke:
        c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 4, 2, 2, 1
        c.train.global_batch_size, c.train.seq_len, c.train.eval_batches = 8, 64, 1
    return c
