"""A small BERT-style encoder on the embedded default corpus, under 10 minutes on 2 CPU cores:

  python -m experiments.run --config configs/mlm/tiny.py --workdir runs/mlm_tiny [--config.mlm.nsp=three_way]

A 4-layer, 128-wide Transformer with bidirectional attention and rotary positions, on bytes,
trained on masked tokens and next-sentence prediction; then fine-tune it with configs/finetune/.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.mlm_config()
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_model = 128
    c.model.d_ff = 512
    c.model.max_seq_len = 256
    # Rotary: a masked position learns only through attention, and relative offsets are what it
    # needs; learned absolute positions kept the encoder on the unigram plateau (docs/ENCODERS.md).
    c.model.positions = "rotary"
    c.tokenizer.kind = "byte"  # 4096 or 1024 sentencepiece pieces learned far slower at this budget
    c.mlm.nsp = "binary"
    c.optimizer.lr = 3e-3
    c.schedule.warmup_steps = 30
    c.train.steps = 800
    c.train.global_batch_size = 16
    c.train.seq_len = 256  # segments A and B of up to 127 bytes each
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    if a.smoke:
        c.model.num_layers, c.model.d_model, c.model.d_ff, c.model.max_seq_len = 2, 64, 256, 64
        c.train.steps, c.train.global_batch_size, c.train.seq_len = 6, 8, 64
        c.train.log_every, c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 2, 3, 2, 3
        c.schedule.warmup_steps = 2
    return c
