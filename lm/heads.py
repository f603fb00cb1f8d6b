"""Heads on the Transformer for encoders and downstream tasks (BERT's pretrain-then-fine-tune).

Each module holds the language model under 'lm' (so a pretrained model's parameters drop in
there) and its head beside it:
  MaskedLM         masked-token logits at the picked positions (tied to the token embeddings) and
                   next-sentence logits from [CLS] (first column) through BERT's tanh pooler.
  DownstreamModel  'classify': one label per row (single texts and sentence pairs alike), read at
                   the first column ([CLS]) of a bidirectional model or at the last real token of a
                   causal one; 'tag': one label per token; 'span': start and end logits per token.
  RewardModel      a scalar score per sequence read at its last token (the RLHF reward model),
                   or per position (PPO's value model).
Padding (segment 0) changes no logit of a real token: attention never crosses segments.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from lm import rl
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


class RewardModel(nn.Module):
    """A scalar reward per sequence: the language model ('lm', a Transformer) read at each row's
    last valid token by a Dense(1) 'head'. Its params are {'lm': plain LM params, 'head': ...}, so a
    language model's checkpoint drops in under 'lm' (an untied model's lm_head is used only with
    the likelihood term). Read at every position instead (`last_index=None`), the same network is
    PPO's value model.

    With `likelihood_term`, the score adds `likelihood_weight` (a learned scalar, starting at 1)
    times the mean log-probability of the response tokens under the model's own language-model
    head, and the head starts at zero: the SFT policy's judgement of its samples, which the
    final-token head alone does not learn
    to read (see docs/RLHF.md for the measured difference).
    """

    config: ModelConfig
    likelihood_term: bool = False

    @nn.compact
    def __call__(
        self,
        tokens,
        last_index=None,
        first_index=None,
        *,
        positions=None,
        segment_ids=None,
        deterministic=True,
    ):
        """Scores sequences, or every position of any layout.

        Args:
          tokens: [batch, seq] int32; with last_index, row i is valid through column last_index[i].
          last_index: [batch] int32 column of each row's last valid token (its EOS), or None.
          first_index: [batch] int32 column of each row's first response token; needed with
            `likelihood_term` and last_index.
          positions, segment_ids: [batch, seq] int32 as for Transformer; with last_index, the
            segment ids default to 1 through last_index and 0 after.
          deterministic: False applies dropout (needs the 'dropout' rng).
        Returns:
          [batch] float32 scores at last_index; without it, [batch, seq] float32 per position.
        """
        cfg = self.config
        b, n = tokens.shape
        if last_index is not None and segment_ids is None:
            segment_ids = (jnp.arange(n, dtype=jnp.int32)[None, :] <= last_index[:, None]).astype(jnp.int32)
        lm = Transformer(cfg, name="lm")
        kw = dict(positions=positions, segment_ids=segment_ids, deterministic=deterministic)
        with_likelihood = self.likelihood_term and last_index is not None
        if with_likelihood:
            logits, hidden = lm.logits_and_hidden(tokens, **kw)  # [batch, seq, vocab], [batch, seq, d]
        else:
            hidden = lm.hidden(tokens, **kw)  # [batch, seq, d_model]
        # N(0, 1/sqrt(d_model + 1)) as in lm-human-preferences: initial scores of about unit scale.
        # With the likelihood term, zero: the model starts as the policy's likelihood (which ranks
        # better than chance) and the head learns what it misses, not first to undo its own noise.
        std = 0.0 if self.likelihood_term else 1 / math.sqrt(cfg.d_model + 1)
        head = Linear((cfg.d_model,), (1,), (EMBED, None), cfg, std=std, name="head")
        if last_index is None:
            return head(hidden.reshape(b * n, cfg.d_model)).reshape(b, n).astype(jnp.float32)  # [batch, seq]
        last = jnp.take_along_axis(hidden, last_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        score = head(last)[:, 0].astype(jnp.float32)  # [batch]
        if not with_likelihood:
            return score
        if first_index is None:
            raise ValueError("a reward model with the likelihood term needs first_index")
        column = jnp.arange(n, dtype=jnp.int32)[None, :]
        in_response = (column >= first_index[:, None]) & (column <= last_index[:, None])  # [batch, seq]
        token_logp = rl.sequence_logprobs(logits, tokens, in_response)  # [batch, seq - 1]
        mean_logp = jnp.sum(token_logp, axis=1) / jnp.maximum(jnp.sum(in_response[:, 1:], axis=1), 1)
        weight = self.param(
            "likelihood_weight", nn.with_logical_partitioning(nn.initializers.ones, ()), (), cfg.params_dtype
        )
        return score + weight.astype(jnp.float32) * mean_logp
