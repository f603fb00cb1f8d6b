"""Batches of ranked comparisons (`preferences.Comparisons`) for the reward model and DPO.

Training batches are grouped by length and trimmed to the width they need (a pure function of
(seed, step)); evaluation batches are fixed, in order of length. Arrays are those of
`Comparisons.take`: tokens [b, K, width], first_index, last_index, ranks, mask [b, K], plus any
per-prompt extras (DPO's reference log-probs).
"""

import jax
import numpy as np

from lm import sharding
from lm.data import preferences

NORM_SAMPLES = 2048  # responses a reward model's normalisation scores at most


def eval_batches(
    comparisons: preferences.Comparisons, batch_size: int, num_batches: int, extra: dict | None = None
) -> list[dict]:
    """This process' part of fixed batches of `batch_size` prompts: the first num_batches x
    batch_size prompts (num_batches <= 0: all), in order of length, each batch trimmed to the
    width it needs; rows past the end are masked out. Arrays as `Comparisons.take`, plus the same
    rows of each `extra` per-prompt array ([n, ...])."""
    used = (
        comparisons.num_prompts
        if num_batches <= 0
        else min(num_batches * batch_size, comparisons.num_prompts)
    )
    lengths = preferences.prompt_lengths(comparisons)[:used]
    order = np.argsort(lengths, kind="stable")
    order = np.concatenate([order, np.zeros(-used % batch_size, order.dtype)])  # padding rows (masked)
    real = np.arange(len(order)) < used
    mine = sharding.process_slice(batch_size)
    batches = []
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        width = preferences.batch_width(lengths[ids], comparisons.tokens.shape[2])
        rows = ids[mine]
        batch = {**comparisons.take(rows), **{name: array[rows] for name, array in (extra or {}).items()}}
        batch["mask"] = batch["mask"] & real[start : start + batch_size][mine, None]
        batches.append(preferences.trim(batch, width))
    return batches


def train_batch_fn(
    comparisons: preferences.Comparisons, take, batch_size: int, seed: int, group: int, batch_sharding
):
    """The training batches: `(batch_fn, step_tokens)`. batch_fn: `step -> batch`, the global batch of
    `preferences.grouped_batch_ids` as sharded arrays, trimmed to the width it needs; step_tokens:
    `step -> batch_size x K x width`, for the loop's token counts. take: `ids [b] -> dict of
    arrays` (`Comparisons.take` or an extension of it)."""
    lengths = preferences.prompt_lengths(comparisons)
    _, k, seq_len = comparisons.tokens.shape

    def ids_and_width(step):
        ids = preferences.grouped_batch_ids(lengths, step, batch_size, seed, group)
        return ids, preferences.batch_width(lengths[ids], seq_len)

    def batch_fn(step):
        ids, width = ids_and_width(step)
        return sharding.global_batch(
            preferences.trim(take(ids[sharding.process_slice(batch_size)]), width), batch_sharding
        )

    return batch_fn, lambda step: batch_size * k * ids_and_width(step)[1]


def ranking_eval_fn(
    eval_step,
    comparisons,
    batch_size: int,
    num_batches: int,
    batch_sharding,
    prefix: str,
    extra: dict | None = None,
):
    """`params -> {<prefix>_loss, <prefix>_accuracy}`, means over the prompts of fixed batches
    (`eval_step(params, batch)` -> [loss_sum, accuracy_sum, weight])."""
    batches = [
        sharding.global_batch(b, batch_sharding)
        for b in eval_batches(comparisons, batch_size, num_batches, extra)
    ]

    def evaluate(params):
        totals = np.zeros(3)
        for batch in batches:
            totals += np.asarray(jax.device_get(eval_step(params, batch)))
        loss_sum, accuracy_sum, weight = totals
        return {
            f"{prefix}_loss": loss_sum / max(weight, 1.0),
            f"{prefix}_accuracy": accuracy_sum / max(weight, 1.0),
        }

    return evaluate


def norm_rows(num: int, seed: int) -> np.ndarray:
    """Which of `num` normalisation responses are scored: all up to NORM_SAMPLES, else a seeded
    sample of that many (its mean and std are within a few hundredths of the full set's, at a
    fraction of the forward passes)."""
    if num <= NORM_SAMPLES:
        return np.arange(num)
    return np.sort(np.random.default_rng([seed, 2]).choice(num, NORM_SAMPLES, replace=False))


def score_rows(
    score_step, tokens: np.ndarray, first_index: np.ndarray, last_index: np.ndarray, rows: int, batch_sharding
) -> np.ndarray:
    """[m, seq] sequences and [m] first and last response columns -> [m] float64 scores, `rows`
    sequences per call (`preferences.in_length_order`); `score_step` takes {tokens [rows, width],
    first_index, last_index [rows, 1]} as global sharded arrays."""

    def call(ids, width):
        mine = ids[sharding.process_slice(rows)]
        batch = sharding.global_batch(
            {
                "tokens": tokens[mine, :width],
                "first_index": first_index[mine, None],
                "last_index": last_index[mine, None],
            },
            batch_sharding,
        )
        return jax.device_get(score_step(batch))

    return preferences.in_length_order(call, last_index + 1, rows, tokens.shape[1])
