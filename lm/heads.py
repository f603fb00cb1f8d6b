"""Heads on the Transformer for encoders and downstream tasks (BERT's pretrain-then-fine-tune).

Each module holds the language model under 'lm' (so a pretrained model's parameters drop in
there) and its head beside it:
  MaskedLM         masked-token logits at the picked positions (tied to the token embeddings) and
                   next-sentence logits from [CLS] (first column) through BERT's tanh pooler.
  DownstreamModel  'classify': one label per row (single texts and sentence pairs alike), read at
                   the first column ([CLS]) of a bidirectional model or at the last real token of a
                   causal one; 'tag': one label per token; 'span': start and end logits per token.
Padding (segment 0) changes no logit of a real token: attention never crosses segments.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from lm.model import Linear, ModelConfig, Transformer
from lm.sharding import EMBED, VOCAB

HEADS = ("classify", "tag", "span")


def token_types(tokens, sep_id: int):
    """BERT's segment of each token: tokens [batch, seq] -> [batch, seq] int32, 0 through the first
    [SEP] (`sep_id`), 1 after it."""
    is_sep = (tokens == sep_id).astype(jnp.int32)
    return (jnp.cumsum(is_sep, axis=1) - is_sep > 0).astype(jnp.int32)


def _pooled(cfg: ModelConfig, hidden, segment_ids):
    """The row's summary [batch, d_model]: the first column when bidirectional, else the last
    token of segment > 0 (a causal model's only token that has seen the whole row)."""
    if cfg.bidirectional:
        return hidden[:, 0]
    last = jnp.maximum(jnp.sum(segment_ids > 0, axis=1) - 1, 0)  # [batch]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


class MaskedLM(nn.Module):
    """BERT's pretraining heads on a (bidirectional) Transformer 'lm' with tied embeddings.

    Params: {'lm': Transformer params, 'bias': [vocab] of the masked-LM logits, 'pooler': [d, d]
    tanh layer, 'nsp': [d, nsp_classes]} (the last two only when nsp_classes > 1).
    """

    config: ModelConfig
    nsp_classes: int = 2  # 1 or 0: no NSP head
    sep_id: int = 2  # [SEP]: token types (with config.type_vocab_size) switch to 1 after the first

    @nn.compact
    def __call__(self, tokens, mlm_positions, *, positions=None, segment_ids=None, deterministic=True):
        """Masked-LM and NSP logits.

        Args:
          tokens: [batch, seq] int32 with [MASK]s; positions, segment_ids: [batch, seq] int32.
          mlm_positions: [batch, picks] int32 columns whose tokens are predicted.
        Returns:
          (mlm logits [batch, picks, vocab] float32, nsp logits [batch, nsp_classes] float32 or
          None without an NSP head).
        """
        cfg = self.config
        lm = Transformer(cfg, name="lm")
        hidden = lm.hidden(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            deterministic=deterministic,
            token_types=token_types(tokens, self.sep_id),
        )
        picked = jnp.take_along_axis(
            hidden, mlm_positions[..., None].astype(jnp.int32), axis=1
        )  # [b, picks, d]
        table = nn.meta.unbox(lm.variables["params"]["token_embed"]["embedding"])  # [vocab, d_model]
        mlm_logits = jnp.einsum(
            "bpd,vd->bpv", picked, table.astype(cfg.compute_dtype), preferred_element_type=jnp.float32
        )
        # BERT's output bias: it learns the token frequencies at once (named so no decay applies).
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, (VOCAB,)), (cfg.vocab_size,)
        )
        mlm_logits = mlm_logits + bias.astype(jnp.float32)
        if self.nsp_classes <= 1:
            return mlm_logits, None
        d = cfg.d_model
        pooled = jnp.tanh(Linear((d,), (d,), (EMBED, None), cfg, name="pooler")(hidden[:, 0]))
        nsp = Linear((d,), (self.nsp_classes,), (None, None), cfg, out_dtype=jnp.float32, name="nsp")(pooled)
        return mlm_logits, nsp


class DownstreamModel(nn.Module):
    """A downstream head on a Transformer 'lm'. Params: {'lm': ..., 'head': Linear [d, outputs]}."""

    config: ModelConfig
    head: str  # one of HEADS
    num_labels: int = 2  # classify and tag; span has 2 outputs (start, end)
    sep_id: int = 2  # as MaskedLM's

    @nn.compact
    def __call__(self, tokens, *, positions=None, segment_ids=None, deterministic=True):
        """tokens: [batch, seq] int32 (segment_ids 0 = padding) -> float32 logits: 'classify'
        [batch, num_labels], 'tag' [batch, seq, num_labels], 'span' [batch, seq, 2] (start, end)."""
        cfg = self.config
        b, n = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, n), jnp.int32)
        hidden = Transformer(cfg, name="lm").hidden(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            deterministic=deterministic,
            token_types=token_types(tokens, self.sep_id),
        )
        outputs = 2 if self.head == "span" else self.num_labels
        head = Linear(
            (cfg.d_model,),
            (outputs,),
            (EMBED, None),
            cfg,
            std=1 / math.sqrt(cfg.d_model),
            out_dtype=jnp.float32,
            name="head",
        )
        if self.head == "classify":
            return head(_pooled(cfg, hidden, segment_ids))
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r} must be one of {HEADS}")
        return head(hidden.reshape(b * n, cfg.d_model)).reshape(b, n, outputs)
