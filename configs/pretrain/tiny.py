"""A small model trained on the embedded default corpus in about 5 minutes on 2 CPU cores.

About 600k tokens in 150 steps (~1.5 s a step on a 2-core AVX2 CPU), data preparation included.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.pretrain_config()
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_model = 256
    c.model.d_ff = 1024
    c.model.max_seq_len = 256
    c.tokenizer.vocab_size = 4096
    # 3e-3 reaches the same loss in 150 steps but leaves blocks that SFT can hardly retrain: SFT
    # on the graded tasks from them stalls near 0.15 while from these it follows random init.
    c.optimizer.lr = 1e-3
    c.schedule.warmup_steps = 30
    c.train.steps = 150
    c.train.global_batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 10
    c.train.eval_every = 75
    c.train.eval_batches = 10
    c.train.checkpoint_every = 75
    if a.smoke:
        common.shrink_for_smoke(c)
    return c
