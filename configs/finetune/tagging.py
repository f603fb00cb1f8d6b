"""Token tagging with Python's `tokenize` categories on held-out code, from an encoder:

  python -m experiments.run --config configs/mlm/tiny.py --workdir runs/mlm_tiny
  python -m experiments.run --config configs/finetune/tagging.py --workdir runs/tag \
      --config.init_from=runs/mlm_tiny [--config.finetune.reinit=True]

Every subword piece is labelled with the category of its first non-space character (keyword, name,
operator, number, string, comment, other); whitespace pieces are not scored. Logs eval_accuracy
and eval_majority_accuracy (the most frequent training label) over the held-out windows.
The other downstream tasks: configs/finetune/package.py, pair.py and span.py.
"""

from configs import common


def get_config(arg=None, task="tagging"):
    a = common.parse_arg(arg, smoke=False)
    c = common.finetune_config()
    c.finetune.task = task
    c.data.num_train = 4000
    c.data.num_eval = 500
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.warmup_fraction = 0.1
    c.train.steps = 400
    c.train.global_batch_size = 32
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    if a.smoke:  # from a configs/mlm/tiny.py:smoke run: bytes, 64 positions
        c.data.num_train, c.data.num_eval = 64, 32
        c.train.steps, c.train.eval_every, c.train.checkpoint_every = 4, 2, 2
        c.train.global_batch_size, c.train.seq_len, c.train.log_every = 8, 64, 2
    return c
