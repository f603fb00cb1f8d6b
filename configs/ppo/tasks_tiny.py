"""PPO of the tiny SFT policy on the graded tasks against the tiny reward model, minutes on 2 CPU cores.

  python -m experiments.run --config configs/ppo/tasks_tiny.py --workdir runs/ppo_tiny \
      --config.init_from=runs/sft_tiny --config.ppo.reward_from=runs/rm_tiny

Each step is one PPO iteration: 32 prompts sampled at temperature 1, 2 epochs x 2 minibatches.
The grader scores every rollout (oracle_score) and greedy answers to held-out prompts at each
eval (eval_grader_score); the policy with the best eval score is kept in workdir/best/.
"""

from configs import common
from configs.reward import tasks_tiny as reward_config


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, oracle=False)
    c = common.ppo_config()
    c.data.source = "graded_tasks"
    c.data.tasks = reward_config.RL_TASKS
    c.data.num_train = 4000  # RL prompts (a different seed from SFT's data)
    c.optimizer.lr = 3e-5
    c.optimizer.weight_decay = 0.0
    c.schedule.kind = "constant"
    c.schedule.warmup_steps = 5
    c.train.steps = 60
    c.train.global_batch_size = 32  # prompts per rollout
    c.train.seq_len = 128
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.ppo.eval_prompts = 200
    c.ppo.kl_coef = 0.05
    c.ppo.value_lr = 3e-4  # 10x the policy's: at 3e-5 the value model learned nothing (explained variance ~0)
    c.ppo.minibatches = 2  # of 16 rollouts: 8-row minibatches run the CPU at half speed
    c.ppo.epochs = 2  # 4 cost 9 minutes of the recipe's 40 and moved no eval score (docs/RLHF.md)
    if a.oracle:  # trained on the grader itself (verifiable rewards): 128 rollouts an iteration
        c.ppo.reward = "oracle"
        c.train.global_batch_size, c.train.steps = 128, 40
        c.ppo.minibatches = 4
    if a.smoke:
        c.data.tasks, c.data.num_train = "add,reverse", 64
        c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 4, 2, 2, 1
        c.train.global_batch_size, c.train.seq_len = 8, 64
        c.ppo.epochs, c.ppo.minibatches, c.ppo.max_new_tokens = 2, 2, 8
        c.ppo.eval_prompts = 8
    return c
