"""SFT on the chosen responses of Anthropic HH dialogues (the InstructGPT recipe's HH variant):

  python -m experiments.run --config configs/sft/hh.py --workdir runs/sft_hh \
      --config.init_from=runs/tiny --config.data.files=hh_rlhf/train.jsonl

Each example is a dialogue up to its last "\n\nAssistant:" (the prompt, every earlier turn kept)
and the chosen final response. The template keeps HH's own format: prompt + ' ' + response. No
grader: the best checkpoint is the one with the lowest held-out loss (the builder's 'validation'
split, prompts picked by hash). Dialogues longer than config.train.seq_len are skipped and counted.
The sizes are the graded-task SFT's (configs/sft/tasks_tiny.py), not tuned on HH.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.sft_config()
    c.data.source = "hh"
    c.data.skip_bad_records = True  # the reward and PPO configs build the same split with the same flag
    c.template.user = ""
    c.template.assistant = " "
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_fraction = 0.05
    c.train.steps = 800
    c.train.global_batch_size = 8
    c.train.seq_len = 256
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.eval_batches = 16
    c.train.checkpoint_every = 200
    if a.smoke:  # a tiny.py:smoke model: bytes, 64 positions
        c.train.seq_len = 64
        c.train.steps, c.train.eval_every, c.train.checkpoint_every = 6, 3, 3
        c.train.global_batch_size, c.train.eval_batches = 8, 2
    return c
