"""Bengio et al. 2003's neural probabilistic language model on tiny.py's data, tokenizer and metrics.

Each token is predicted from the 5 before it (the input token included; the paper's best models
condition on 5 words) through 128-wide embeddings and 256 tanh hidden units, without direct
connections. It is cheap per token, so it takes a higher learning rate and more tokens than
tiny.py in about the same time: 600 steps of 32 x 256 tokens, evaluated on the whole held-out
split at the end.
"""

from configs import common
from configs.pretrain import tiny


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = tiny.get_config()
    c.model.kind = "nnlm"
    c.model.d_model = 128  # the embedding size m
    c.model.nnlm_context = 5
    c.model.nnlm_hidden = 256
    c.model.nnlm_direct = False
    c.optimizer.lr = 3e-2
    c.schedule.warmup_steps = 30
    c.train.steps = 600
    c.train.global_batch_size = 32
    c.train.log_every = 50
    c.train.eval_every = 0
    c.train.eval_batches = 0
    c.train.checkpoint_every = 300
    if a.smoke:
        common.shrink_for_smoke(c)
        c.model.nnlm_hidden = 64
    return c
