"""GRPO of an SFT policy on the prompts of TRL-style JSONL ({"prompt": str} per line, other keys
ignored) against a reward model (configs/reward/trl.py):

  python -m experiments.run --config configs/grpo/trl.py --workdir runs/grpo_trl \
      --config.init_from=runs/sft_trl --config.grpo.reward_from=runs/rm_trl \
      --config.data.files=prompts.jsonl

As configs/grpo/tasks_tiny.py, but the prompts are the files' distinct 'train' prompts (those
longer than seq_len - grpo.max_new_tokens skipped and counted) and there is no oracle: grpo.reward
must be 'rm', and best/ keeps the policy whose greedy responses to held-out prompts the reward
model scores highest (eval_rm_score).
A bad line stops the run with one line naming it; --config.data.skip_bad_records=True skips and
counts bad lines instead (the same flag in every stage: it is part of the split).
"""

from configs import common
from configs.grpo import tasks_tiny


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = tasks_tiny.get_config("smoke" if a.smoke else None)  # its tasks go unused here
    c.data.source = "trl"
    c.data.skip_bad_records = False  # a malformed line stops the run (see above)
    if not a.smoke:
        c.train.seq_len = 256  # prompt + response
        c.grpo.eval_prompts = 128  # held-out prompts of eval_rm_score
    return c
