"""PPO of an HH SFT policy (configs/sft/hh.py) on HH prompts against an HH reward model
(configs/reward/hh.py):

  python -m experiments.run --config configs/ppo/hh.py --workdir runs/ppo_hh \
      --config.init_from=runs/sft_hh --config.ppo.reward_from=runs/rm_hh \
      --config.data.files=hh_rlhf/train.jsonl

Prompts: the HH builder's 'train' dialogues up to their last "\n\nAssistant:" (distinct ones),
formatted as the SFT run saw them; those longer than seq_len - ppo.max_new_tokens are skipped and
counted (run.num_skipped_too_long in config.json). No oracle: each eval scores greedy responses to
held-out ('validation') prompts with the reward model (eval_rm_score, normalised) and best/ keeps
the policy that scores highest. data.files, eval_fraction and skip_bad_records must be the SFT and
reward runs' (the same split). The settings are the graded-task PPO's (configs/ppo/tasks_tiny.py).
"""

from configs import common
from configs.ppo import tasks_tiny


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = tasks_tiny.get_config(arg)  # the graded-task PPO's settings; its tasks go unused here
    c.data.source = "hh"
    c.data.skip_bad_records = True
    if not a.smoke:  # smoke: tasks_tiny's (bytes, 64 positions, 8 prompts)
        c.train.seq_len = 256  # prompt + response
        c.ppo.eval_prompts = 128  # held-out prompts of eval_rm_score
    return c
