"""PPO of an HH SFT policy (configs/sft/hh.py) on HH prompts against an HH reward model (configs/reward/hh.py):

  python -m experiments.run --config configs/ppo/hh.py --workdir runs/ppo_hh \
      --config.init_from=runs/sft_hh --config.ppo.reward_from=runs/rm_hh --config.data.files=hh_rlhf/train.jsonl

Prompts: the HH builder's 'train' dialogues up to their last "\n\nAssistant:" (distinct ones),
formatted as the SFT run saw them; those longer than seq_len - ppo.max_new_tokens are skipped and
counted (run.num_skipped_too_long in config.json). No oracle: each eval scores greedy responses to
held-out ('validation') prompts with the reward model (eval_rm_score, normalised) and best/ keeps
the policy that scores highest. data.files, eval_fraction and skip_bad_records must be the SFT and
reward runs' (the same split). The settings are the graded-task PPO's (configs/ppo/tasks_tiny.py).
"""
from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.get_base_config()
    c.task = 'ppo'
    c.data.source = 'hh'
    c.data.skip_bad_records = True
    c.optimizer.lr = 3e-5
    c.optimizer.weight_decay = 0.0
    c.schedule.kind = 'constant'
    c.schedule.warmup_steps = 5
    c.train.steps = 60
    c.train.global_batch_size = 32    # prompts per rollout
    c.train.seq_len = 256             # prompt + response
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.sft.eval_prompts = 128          # held-out prompts of eval_rm_score
    c.ppo.kl_coef = 0.05
    c.ppo.minibatches = 2
    c.ppo.epochs = 2
    c.ppo.max_new_tokens = 32
    if a.smoke:  # from an sft/hh.py:smoke run: bytes, 64 positions
        c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 4, 2, 2, 1
        c.train.global_batch_size, c.train.seq_len = 8, 64
        c.ppo.epochs, c.ppo.minibatches, c.ppo.max_new_tokens = 2, 2, 8
        c.sft.eval_prompts = 8
    return c
