"""GRPO of the tiny SFT policy on the graded tasks, minutes on 2 CPU cores.

  python -m experiments.run --config configs/grpo/tasks_tiny.py --workdir runs/grpo_tiny \
      --config.init_from=runs/sft_tiny --config.grpo.reward_from=runs/rm_tiny [--config.grpo.reward=oracle]

Each step is one GRPO iteration: 16 prompts x 8 responses at temperature 1, one pass in 4
minibatches. The grader scores every rollout (oracle_score); with grpo.reward=oracle it is also
the reward (verifiable rewards). Greedy answers to held-out prompts are graded at each eval
(eval_grader_score); the best policy is kept in workdir/best/.
"""

from configs import common
from configs.reward import tasks_tiny as reward_config


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False, oracle=False)
    c = common.grpo_config()
    c.data.source = "graded_tasks"
    c.data.tasks = reward_config.RL_TASKS
    c.data.num_train = 4000  # RL prompts (a different seed from SFT's data)
    c.optimizer.lr = 3e-5
    c.optimizer.weight_decay = 0.0
    c.schedule.kind = "constant"
    c.schedule.warmup_steps = 5
    c.train.steps = 60
    c.train.global_batch_size = 16  # prompts per iteration, each sampled group_size times
    c.train.seq_len = 128
    c.train.log_every = 5
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.grpo.group_size = 8
    c.grpo.minibatches = 4
    c.grpo.epochs = 1
    if a.oracle:  # trained on the grader itself (verifiable rewards)
        c.grpo.reward = "oracle"
        # Chosen on the dev prompts (docs/RLHF.md): samples at 0.5 agree with the greedy answers
        # the report scores, and constrained_line reaches 0.99 in 40 iterations.
        c.optimizer.lr, c.grpo.temperature, c.train.steps = 1e-4, 0.5, 40
    if a.smoke:
        c.data.tasks, c.data.num_train = "add,reverse", 64
        c.train.steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 4, 2, 2, 1
        c.train.global_batch_size, c.train.seq_len = 4, 64
        c.grpo.group_size, c.grpo.minibatches, c.grpo.max_new_tokens, c.grpo.eval_prompts = 4, 2, 8, 8
    return c
