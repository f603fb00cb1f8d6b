"""GPT-2 small (124M parameters: tied embeddings, vocab 50257, context 1024), for accelerators.

`configs/pretrain/gpt2.py:smoke` shrinks it to a seconds-long CPU run of the same code paths.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.pretrain_config()
    c.model.vocab_size = 50257
    c.model.num_layers = 12
    c.model.num_heads = 12
    c.model.d_model = 768
    c.model.d_ff = 3072
    c.model.max_seq_len = 1024
    c.tokenizer.vocab_size = 50257
    c.precision.compute_dtype = "bfloat16"
    c.optimizer.lr = 6e-4
    c.optimizer.weight_decay = 0.1
    c.schedule.warmup_steps = 2000
    c.train.steps = 100_000
    c.train.global_batch_size = 512
    c.train.seq_len = 1024
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
    if a.smoke:
        common.shrink_for_smoke(c)
    return c
