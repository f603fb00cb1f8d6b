"""A reward model on Anthropic HH preference triples (chosen vs rejected), from an SFT run:

  python -m experiments.run --config configs/reward/hh.py --workdir runs/rm_hh \
      --config.init_from=runs/sft_hh --config.data.files=hh_rlhf/train.jsonl

K = 2: each triple is one comparison, chosen rank 0, rejected rank 1; the HH builder's
'validation' split (prompts picked by hash, config.data.eval_fraction) gives the held-out ones.
The normalisation runs over the chosen responses. Triples longer than config.train.seq_len with
the template are skipped and counted (config.data.skip_bad_records).
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.reward_config()
    c.data.source = "hh"
    c.data.skip_bad_records = True
    c.reward.num_prompts = 0  # every train triple that fits
    c.reward.num_eval_prompts = 0
    c.optimizer.lr = 1e-4
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_fraction = 0.05
    c.train.steps = 1000
    c.train.global_batch_size = 16  # triples
    c.train.seq_len = 256
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.eval_batches = 0
    c.train.checkpoint_every = 200
    if a.smoke:  # from a tasks_tiny.py:smoke SFT run: bytes, 64 positions
        c.train.seq_len = 64
        c.reward.num_prompts, c.reward.num_eval_prompts = 64, 16
        c.train.steps, c.train.eval_every, c.train.checkpoint_every = 6, 3, 3
        c.train.global_batch_size, c.train.log_every = 8, 2
    return c
