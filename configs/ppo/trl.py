"""PPO of an SFT policy on the prompts of TRL-style JSONL ({"prompt": str} per line, other keys
ignored: a preference file serves too) against a reward model (configs/reward/trl.py):

  python -m experiments.run --config configs/ppo/trl.py --workdir runs/ppo_trl \
      --config.init_from=runs/sft_trl --config.ppo.reward_from=runs/rm_trl \
      --config.data.files=prompts.jsonl

Prompts: the distinct 'train' prompts, formatted as the SFT run saw them; those longer than
seq_len - ppo.max_new_tokens are skipped and counted. No oracle (ppo.reward must be 'rm'): each
eval scores greedy responses to held-out ('validation') prompts with the reward model
(eval_rm_score) and best/ keeps the policy that scores highest. The settings are the HH PPO's.
A bad line stops the run with one line naming it; --config.data.skip_bad_records=True skips and
counts bad lines instead (the same flag in every stage: it is part of the split).
"""

from configs.ppo import hh


def get_config(arg=None):
    c = hh.get_config(arg)
    c.data.source = "trl"
    c.data.skip_bad_records = False  # a malformed line stops the run (see above)
    return c
