"""A Llama-style ~350M model (rotary, RMSNorm, SwiGLU, grouped-query attention, untied), for accelerators.

`configs/pretrain/llama.py:smoke` shrinks it to a seconds-long CPU run of the same code paths.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.pretrain_config()
    c.model.vocab_size = 32000
    c.model.num_layers = 24
    c.model.num_heads = 16
    c.model.num_kv_heads = 4
    c.model.d_model = 1024
    c.model.d_ff = 2816  # ~8/3 * d_model, rounded to a multiple of 256
    c.model.max_seq_len = 2048
    c.model.positions = "rotary"
    c.model.norm = "rmsnorm"
    c.model.mlp = "swiglu"
    c.model.tie_embeddings = False
    c.model.use_bias = False
    c.tokenizer.vocab_size = 32000
    c.precision.compute_dtype = "bfloat16"
    c.optimizer.lr = 3e-4
    c.schedule.kind = "wsd"
    c.schedule.warmup_steps = 2000
    c.train.steps = 100_000
    c.train.global_batch_size = 256
    c.train.seq_len = 2048
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    c.train.log_every = 50
    if a.smoke:
        common.shrink_for_smoke(c)
    return c
