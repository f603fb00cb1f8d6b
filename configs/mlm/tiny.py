"""A small BERT-style encoder on the embedded default corpus, under 10 minutes on 2 CPU cores:

  python -m experiments.run --config configs/mlm/tiny.py --workdir runs/mlm_tiny [--config.mlm.nsp=three_way]

The tiny pretrained model's shape (configs/pretrain/tiny.py) with bidirectional attention, trained
on masked tokens and next-sentence prediction; then fine-tune it with configs/finetune/.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.mlm_config()
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.d_model = 256
    c.model.d_ff = 1024
    c.model.max_seq_len = 128
    c.tokenizer.vocab_size = 4096  # pretraining's tokenizer (cached in the data dir), plus [MASK]
    c.mlm.nsp = "binary"
    c.optimizer.lr = 1e-3
    c.schedule.warmup_steps = 30
    c.train.steps = 300
    c.train.global_batch_size = 32
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 8
    c.train.checkpoint_every = 100
    if a.smoke:
        c.model.num_layers, c.model.d_model, c.model.d_ff, c.model.max_seq_len = 2, 64, 256, 64
        c.tokenizer.kind = "byte"
        c.train.steps, c.train.global_batch_size, c.train.seq_len = 6, 8, 64
        c.train.log_every, c.train.eval_every, c.train.eval_batches, c.train.checkpoint_every = 2, 3, 2, 3
        c.schedule.warmup_steps = 2
    return c
