"""Autoregressive generation: temperature, top-k, top-p and EOS, jitted once per shape.

Prompts of different lengths are left-padded to a common length rounded up to a multiple of
`PROMPT_BUCKET` (padding is segment 0; each row's positions start at 0 at its first real
token). `generate` prefills a KV cache in one call, then decodes one token per step inside a
`lax.while_loop` that exits when every row has emitted EOS. `generate_recompute` runs the full
forward pass over a fixed `[batch, bucket + max_new_tokens]` buffer each step: the no-cache
baseline for tests and benchmarks. Both are compiled once per
(batch, prompt bucket, max_new_tokens) shape; sampling settings (`SamplingSettings`) are traced,
not static.

Returned completions contain the new tokens only, cut after the first EOS, which is included
(so a finished completion can be told from one that ran out of tokens).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import ConfigError
from lm.model import ModelConfig, build_model, init_cache

PROMPT_BUCKET = 16


def _filter(scaled, top_k, top_p):
    """Sets logits outside the top-k / top-p (nucleus) set to -inf; [batch, vocab] -> same."""
    ranked = -jnp.sort(-scaled, axis=-1)  # [batch, vocab] descending
    kth = jnp.take(ranked, jnp.maximum(top_k - 1, 0), axis=-1)  # [batch]
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    ranked = jnp.where(ranked >= kth[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass ranked above each
    n_keep = jnp.sum(before < top_p, axis=-1)  # [batch], >= 1
    nucleus = jnp.take_along_axis(ranked, n_keep[:, None] - 1, axis=-1)[:, 0]
    threshold = jnp.maximum(kth, jnp.where(top_p < 1.0, nucleus, -jnp.inf))  # [batch]
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf)


def sample_tokens(logits, rng, temperature, top_k, top_p):
    """Draws one token per row from filtered, temperature-scaled logits.

    Only the branch in use runs: greedy is an argmax, and the sort behind top-k / top-p
    (the slowest part of a decode step on CPU) is skipped when both are off.

    Args:
      logits: [batch, vocab] float32.
      rng: a PRNG key.
      temperature: [] float; 0 -> greedy (argmax).
      top_k: [] int; keep the k most likely tokens (ties at the k-th kept); 0 = off.
      top_p: [] float; keep the smallest most-likely set with probability >= top_p; 1.0 = off.
    Returns:
      [batch] int32 token ids.
    """

    def sample():
        scaled = logits / temperature
        scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), _filter, lambda s, k, p: s, scaled, top_k, top_p)
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    greedy = lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature > 0, sample, greedy)


def _decode(first_logits, state, next_logits, rng, settings, max_new_tokens: int):
    """The shared loop: sample, stop rows at EOS, ask `next_logits` for the following step.

    Args:
      first_logits: [batch, vocab] float32 logits for the first new token.
      state: the caller's loop state (a KV cache, or a token buffer).
      next_logits: (state, step, tokens [batch]) -> (logits [batch, vocab], state), run after
        `tokens` was sampled as new token number `step`.
      settings: `SamplingSettings` of traced scalars.
    Returns:
      (tokens [batch, max_new_tokens] int32, pad_id after each row's EOS; log-probs
      [batch, max_new_tokens] float32 of each sampled token under the temperature-scaled softmax
      before top-k / top-p filtering (the policy PPO trains), 0 after EOS).
    """
    temperature = settings.temperature
    batch = first_logits.shape[0]

    def emit(step, logits, out, logps, done):
        token = sample_tokens(
            logits, jax.random.fold_in(rng, step), temperature, settings.top_k, settings.top_p
        )
        token = jnp.where(done, settings.pad_id, token)  # [batch]
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
        logp = jnp.take_along_axis(jax.nn.log_softmax(scaled), token[:, None], axis=-1)[:, 0]
        logps = logps.at[:, step].set(jnp.where(done, 0.0, logp))
        return token, out.at[:, step].set(token), logps, done | (token == settings.eos_id)

    def body(carry):
        step, state, token, out, logps, done = carry
        logits, state = next_logits(state, step, token)
        token, out, logps, done = emit(step + 1, logits, out, logps, done)
        return step + 1, state, token, out, logps, done

    def cond(carry):
        step, done = carry[0], carry[-1]
        return (step + 1 < max_new_tokens) & ~jnp.all(done)

    out = jnp.full((batch, max_new_tokens), settings.pad_id, jnp.int32)
    logps = jnp.zeros((batch, max_new_tokens), jnp.float32)
    token, out, logps, done = emit(0, first_logits, out, logps, jnp.zeros((batch,), bool))
    carry = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, token, out, logps, done))
    return carry[3], carry[4]


def prompt_layout(lengths, width: int, prompt_width: int):
    """Positions and segment ids of left-padded rows; columns past the prompt are generated.

    Args:
      lengths: [batch] int32 real prompt lengths; prompts end at column prompt_width - 1.
    Returns:
      (positions, segment_ids): [batch, width] int32; padding is segment 0 at position 0.
    """
    pad = prompt_width - lengths  # [batch]
    column = jnp.arange(width, dtype=jnp.int32)[None, :]  # [1, width]
    return jnp.maximum(column - pad[:, None], 0), (column >= pad[:, None]).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate_cached(params, tokens, lengths, rng, settings, *, config: ModelConfig, max_new_tokens: int):
    """tokens: [batch, prompt] left-padded, lengths: [batch] -> (new tokens, their log-probs), each
    [batch, max_new_tokens] (see `_decode`)."""
    model = build_model(config)
    batch, prompt = tokens.shape
    positions, segments = prompt_layout(lengths, prompt, prompt)
    cache = init_cache(config, batch, prompt + max_new_tokens)
    logits, cache = model.apply(
        params, tokens, cache, positions=positions, segment_ids=segments, method="prefill"
    )  # [batch, vocab]

    def next_logits(cache, step, token):
        position = (lengths + step)[:, None]  # [batch, 1]
        logits, cache = model.apply(
            params,
            token[:, None],
            cache,
            positions=position,
            segment_ids=jnp.ones_like(position),
            method="extend",
        )
        return logits[:, 0], cache

    return _decode(logits, cache, next_logits, rng, settings, max_new_tokens)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate_recompute(params, tokens, lengths, rng, settings, *, config: ModelConfig, max_new_tokens: int):
    """As `_generate_cached`, by a full forward over [batch, prompt + max_new_tokens] per step."""
    model = build_model(config)
    batch, prompt = tokens.shape
    width = prompt + max_new_tokens
    positions, segments = prompt_layout(lengths, width, prompt)
    buffer = jnp.pad(tokens, ((0, 0), (0, max_new_tokens)))  # [batch, width]

    def logits_at(buffer, column):
        logits = model.apply(params, buffer, positions=positions, segment_ids=segments)
        return jax.lax.dynamic_index_in_dim(logits, column, axis=1, keepdims=False)

    def next_logits(buffer, step, token):
        buffer = jax.lax.dynamic_update_slice(buffer, token[:, None], (0, prompt + step))
        return logits_at(buffer, prompt + step), buffer

    return _decode(logits_at(buffer, prompt - 1), buffer, next_logits, rng, settings, max_new_tokens)


def left_pad(prompts, pad_id: int, config: ModelConfig, max_new_tokens: int):
    """Prompts -> (tokens [batch, bucket] int32 left-padded, lengths [batch] int32)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths.min() == 0:
        raise ValueError("generate needs at least one prompt, and no empty prompts")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if (
        config.kind == "transformer"
        and config.positions == "learned"
        and config.prompt_length + lengths.max() + max_new_tokens > config.max_seq_len
    ):
        soft = f"a soft prompt ({config.prompt_length}) + " if config.prompt_length else ""
        raise ConfigError(
            f"config.model.max_seq_len={config.max_seq_len} is less than {soft}the longest "
            f"prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) "
            "that learned positions must cover"
        )
    width = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = prompt
    return tokens, lengths


class SamplingSettings(NamedTuple):
    """The sampling settings that the jitted samplers take: a pytree of [] arrays, traced (not
    static), so changing a value never recompiles. Build it with `SamplingSettings.create`, which
    fixes each field's dtype (a Python scalar would be traced with a weak type of its own).

    Fields:
      temperature: [] float32; 0 -> greedy.
      top_k: [] int32; 0 = off.
      top_p: [] float32; 1.0 = off.
      eos_id: [] int32; a row stops after emitting it.
      pad_id: [] int32; fills each row after its EOS.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    eos_id: jax.Array
    pad_id: jax.Array

    @classmethod
    def create(
        cls, temperature: float, top_k: int, top_p: float, eos_id: int, pad_id: int
    ) -> "SamplingSettings":
        """Settings from Python scalars, each cast to its field's dtype."""
        return cls(
            temperature=jnp.float32(temperature),
            top_k=jnp.int32(top_k),
            top_p=jnp.float32(top_p),
            eos_id=jnp.int32(eos_id),
            pad_id=jnp.int32(pad_id),
        )


def sample_arrays(params, tokens, lengths, rng, settings, *, config: ModelConfig, max_new_tokens: int):
    """The cached sampler on device arrays, for callers that keep working on device (PPO rollouts).

    Args:
      tokens: [batch, prompt] int32 left-padded prompts (`left_pad`); lengths: [batch] int32.
      settings: a `SamplingSettings` (from `SamplingSettings.create`).
    Returns:
      (new tokens [batch, max_new_tokens] int32, pad after EOS; their log-probs [batch,
      max_new_tokens] float32 under the temperature-scaled softmax, 0 after EOS).
    """
    return _generate_cached(
        params, tokens, lengths, rng, settings, config=config, max_new_tokens=max_new_tokens
    )


def _run(fn, params, config, prompts, max_new_tokens, rng, temperature, top_k, top_p, eos_id, pad_id):
    tokens, lengths = left_pad(prompts, pad_id, config, max_new_tokens)
    settings = SamplingSettings.create(
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id
    )
    out = np.asarray(
        fn(params, tokens, lengths, rng, settings, config=config, max_new_tokens=max_new_tokens)[0]
    )  # [batch, max_new_tokens]
    completions = []
    for row in out.tolist():
        completions.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return completions


def generate(
    params,
    config: ModelConfig,
    prompts: list,
    *,
    max_new_tokens: int,
    rng,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int,
    pad_id: int = 0,
) -> list:
    """Samples completions with a KV cache: one prefill call, then one token per step.

    Args:
      params: the model variables ({'params': ...}) for `build_model(config)`.
      prompts: batch of token id lists, any non-zero lengths.
      max_new_tokens: tokens generated per prompt at most.
      rng: PRNG key; step t uses fold_in(rng, t).
      temperature: 0 -> greedy. top_k: 0 = off. top_p: 1.0 = off.
      eos_id: a row stops after emitting it. pad_id: the left padding token.
    Returns:
      New tokens per prompt, cut after the first EOS (EOS included).
    """
    return _run(
        _generate_cached,
        params,
        config,
        prompts,
        max_new_tokens,
        rng,
        temperature,
        top_k,
        top_p,
        eos_id,
        pad_id,
    )


def generate_sorted(
    params,
    config: ModelConfig,
    prompts: list,
    *,
    max_batch: int,
    max_new_tokens: int,
    rng,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int,
    pad_id: int = 0,
) -> list:
    """`generate` over any number of prompts, at most `max_batch` rows per call (as many calls as
    that needs, rows shared evenly among them), completions in the prompts' order.

    Rows go through in order of length, so a call pads its prompts to the bucket of its own
    longest one and its rows tend to finish together (a prefill over 64 columns where most
    prompts have 23 tokens costs three times the work). The last call is filled with copies of its
    first row, so every call has one shape per prompt bucket: compiled once. Call c samples with
    fold_in(rng, c).

    Returns:
      [n] completions as `generate`'s.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    calls = -(-len(prompts) // max_batch)
    batch = -(-len(prompts) // calls)
    completions = [None] * len(prompts)
    for c, start in enumerate(range(0, len(prompts), batch)):
        rows = order[start : start + batch]
        chunk = [prompts[i] for i in rows]
        chunk += [chunk[0]] * (batch - len(chunk))
        outs = generate(
            params,
            config,
            chunk,
            max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(rng, c),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        for i, out in zip(rows, outs):
            completions[i] = out
    return completions


def generate_recompute(
    params,
    config: ModelConfig,
    prompts: list,
    *,
    max_new_tokens: int,
    rng,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int,
    pad_id: int = 0,
) -> list:
    """As `generate`, without a cache: a full forward over the fixed padded buffer each step."""
    return _run(
        _generate_recompute,
        params,
        config,
        prompts,
        max_new_tokens,
        rng,
        temperature,
        top_k,
        top_p,
        eos_id,
        pad_id,
    )
