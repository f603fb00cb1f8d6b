"""SFT on any instruction file in the Alpaca format (a JSON array or JSONL of records with
`instruction`, `input`, `output`):

  python -m experiments.run --config configs/sft/alpaca.py --workdir runs/sft_alpaca \
      --config.init_from=runs/tiny --config.data.files=alpaca_data.json

A malformed record stops the run before training with one line naming the file and the record;
`--config.data.skip_bad_records=True` skips and counts such records instead.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.sft_config()
    c.data.source = "alpaca"
    c.template.user = "### Instruction:\n"
    c.template.assistant = "\n\n### Response:\n"
    c.optimizer.lr = 3e-4
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_fraction = 0.03
    c.train.steps = 1000
    c.train.global_batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.eval_batches = 10
    c.train.checkpoint_every = 200
    if a.smoke:
        c.train.steps, c.train.eval_every, c.train.checkpoint_every = 6, 3, 3
        c.train.global_batch_size, c.train.eval_batches = 8, 2
    return c
