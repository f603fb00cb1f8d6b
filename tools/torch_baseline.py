"""The PyTorch baseline of `tools.bench train`: our GPT-2 style model in plain PyTorch, nanoGPT style.

It mirrors `lm.model.Transformer` for GPT-2 style configs: learned positions, pre-norm LayerNorm
blocks, causal self-attention, a GELU (tanh) MLP, a final LayerNorm and the output head tied to the
token embedding; biases in every Linear and LayerNorm when `use_bias`. The initialisation is the
same (normal 0.02, residual projections 0.02 / sqrt(2 * layers), zero biases, unit norm scales), as
is the optimizer: AdamW with weight decay on the kernels only (and on embeddings if asked) after
clipping the global gradient norm. The learning rate is constant (our schedule costs nothing).

Only this file (and the bench function that imports it) imports torch: the library `lm/` never does.
"""

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from lm.model import ModelConfig

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_supported(c: ModelConfig) -> None:
    """Raises ValueError for configs this GPT-2 style baseline does not reproduce."""
    unsupported = {
        "kind": (c.kind, "transformer"),
        "positions": (c.positions, "learned"),
        "norm": (c.norm, "layernorm"),
        "mlp": (c.mlp, "gelu"),
        "tie_embeddings": (c.tie_embeddings, True),
        "num_kv_heads": (c.kv_heads, c.num_heads),
        "head_dim": (c.head_size, c.d_model // c.num_heads),
        "param_dtype": (c.param_dtype, "float32"),
        "dropout": (c.dropout, 0.0),
    }
    bad = [f"{k}={have!r}" for k, (have, want) in unsupported.items() if have != want]
    if bad:
        raise ValueError(f"the torch baseline is GPT-2 style only; this config has {', '.join(bad)}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused QKV projection, then the output projection."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.c_attn = nn.Linear(c.d_model, 3 * c.d_model, bias=c.use_bias)
        self.c_proj = nn.Linear(c.d_model, c.d_model, bias=c.use_bias)

    def forward(self, x):
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.num_heads, d // self.num_heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [batch, heads, seq, head_dim]
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class Block(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.use_bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.use_bias)
        self.c_fc = nn.Linear(c.d_model, c.d_ff, bias=c.use_bias)
        self.mlp_proj = nn.Linear(c.d_ff, c.d_model, bias=c.use_bias)

    def forward(self, x):
        """x: [batch, seq, d_model] -> same."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token and learned position embeddings, blocks, final LayerNorm, head tied to the embedding."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        check_supported(c)
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.d_model, eps=c.norm_eps, bias=c.use_bias)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                residual = name.endswith(("attn.c_proj.weight", "mlp_proj.weight"))
                nn.init.normal_(p, std=c.residual_std if residual else 0.02)

    def forward(self, tokens, targets):
        """tokens, targets: [batch, seq] int64 -> mean next-token cross-entropy (a scalar)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # [batch, seq, vocab]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model: GPT, opt_cfg) -> torch.optim.AdamW:
    """AdamW as `lm.optim.make_optimizer`: decay on Linear kernels (embeddings only if asked)."""
    embeddings = {id(model.wte.weight), id(model.wpe.weight)}
    decay, no_decay = [], []
    for p in model.parameters():
        decays = p.dim() == 2 and (opt_cfg.decay_embeddings or id(p) not in embeddings)
        (decay if decays else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": opt_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=opt_cfg.eps)


def train_steps(c: ModelConfig, opt_cfg, tokens, mode: str, steps: int):
    """A function that runs `steps` train steps of the baseline on `tokens` (and returns when done).

    Args:
      c: the model (its `dtype` is the autocast compute dtype; parameters stay float32).
      opt_cfg: `config.optimizer`.
      tokens: [batch, seq + 1] int array; inputs are tokens[:, :-1], targets tokens[:, 1:].
      mode: 'eager' or 'compile' (`torch.compile` of the model, as nanoGPT does; it compiles in
        the first call).
    """
    torch.manual_seed(0)
    model = GPT(c)
    optimizer = make_optimizer(model, opt_cfg)
    forward = torch.compile(model) if mode == "compile" else model
    data = torch.as_tensor(tokens, dtype=torch.long)
    inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def run_steps():
        for _ in range(steps):
            with torch.autocast("cpu", dtype=TORCH_DTYPES[c.dtype], enabled=c.dtype != "float32"):
                loss = forward(inputs, targets)
            loss.backward()
            if opt_cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run_steps


def describe() -> str:
    """The torch version and its intra-op thread count."""
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def init_loss(c: ModelConfig, tokens) -> float:
    """The baseline's loss at initialisation on `tokens` [batch, seq + 1] (about ln(vocab))."""
    torch.manual_seed(0)
    data = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        return float(GPT(c)(data[:, :-1], data[:, 1:]))


def num_params(c: ModelConfig) -> int:
    """Parameters of the baseline, the tied head counted once."""
    return sum(p.numel() for p in GPT(c).parameters())


def matmul_flops(n: int = 2048, repeats: int = 7) -> float:
    """torch's float32 [n, n] @ [n, n] FLOP/s: median of `repeats` after one warm-up."""
    a = torch.ones(n, n)
    a @ a
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds)
