"""GPT-2 style models of the GPU benchmark (`python -m tools.gpu_bench`): ~125M or ~350M, context
1024 or 2048, bfloat16 compute with float32 parameters.

`get_config('size=125m|350m,seq=1024|2048,attention=cudnn|xla')`: 125m is GPT-2 small (12 layers,
12 heads, width 768), 350m GPT-2 medium (24 layers, 16 heads, width 1024); d_ff = 4 x width,
learned positions, biases, tied embeddings, vocab 50304 (GPT-2's 50257 padded to a multiple of 64,
as nanoGPT does); 16,384 tokens a step (batch 16 at 1024, 8 at 2048); attention through cuDNN's
fused kernel unless
`attention=xla`. Add `smoke` for a seconds-long CPU run of the same code (XLA attention).
"""

from configs import common

SIZES = {
    "125m": dict(num_layers=12, num_heads=12, d_model=768),
    "350m": dict(num_layers=24, num_heads=16, d_model=1024),
}
TOKENS_PER_STEP = 16384


def get_config(arg=None):
    a = common.parse_arg(arg, size="125m", seq=1024, attention="cudnn", smoke=False)
    if a.size not in SIZES:
        raise ValueError(f"size={a.size!r}: expected one of {sorted(SIZES)}")
    c = common.pretrain_config()
    c.model.update(vocab_size=50304, d_ff=4 * SIZES[a.size]["d_model"], max_seq_len=a.seq, **SIZES[a.size])
    c.tokenizer.vocab_size = 50257
    c.model.attention = "xla" if a.smoke else a.attention
    c.precision.compute_dtype = "bfloat16"
    c.optimizer.lr = 6e-4
    c.train.global_batch_size = max(1, TOKENS_PER_STEP // a.seq)
    c.train.seq_len = a.seq
    if a.smoke:
        common.shrink_for_smoke(c)
    return c
