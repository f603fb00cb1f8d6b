"""Scoring a trained language model outside training: held-out bits per byte, log-likelihoods of
continuations (multiple choice), and k-shot prompts of the graded tasks (in-context learning).

Bits per byte: the summed next-token loss (nats) over every target of packed held-out rows, over
ln 2 times the UTF-8 bytes those targets stand for (`tokenizer.token_bytes()`; BOS is never a
target, EOS stands for 0 bytes). It is `lm_eval_fn`'s figure over the whole split.

Multiple choice (lm-evaluation-harness's conventions): an item is {"context", "choices", "gold"};
each choice is scored by the log-likelihood of its tokens after the context, where the pair is
encoded as the harness does: context whitespace at the end moves to the continuation, and the
continuation's tokens are those of encode(context + choice) after encode(context). `acc` picks the
highest log-likelihood, `acc_norm` the highest log-likelihood per character of the choice; ties go
to the first choice (np.argmax). A context longer than the model's window loses tokens at its left.

k-shot: k solved training-split examples of a task, then the held-out prompt, as a conversation in
the run's template (user turn = prompt, assistant turn = answer); the model's greedy answer is cut
at its first newline (a graded answer is one line) and graded. Shots never include the test item,
nor any example whose text contains the test item's answer.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lm import evaluation
from lm.data import graded_tasks, pipeline
from lm.data import sft as sft_data
from lm.data import tokenizer as tokenizer_lib
from lm.model import build_model

BUCKET = 32  # continuation scoring pads sequences to a multiple of this many columns


def bits_per_byte(model, params, rows: pipeline.PackedRows, token_bytes: np.ndarray, batch_size: int) -> dict:
    """Held-out figures of `model` over every row of `rows`, in fixed-shape batches of `batch_size`.

    Args:
      model: a language model module (`lm.model.build_model`); params its parameters.
      rows: packed held-out rows [num_rows, seq_len]; token_bytes: [vocab] UTF-8 bytes per token id.
    Returns:
      {"bits_per_byte", "loss" (nats per target token), "targets", "bytes"}.
    """

    sums = evaluation.lm_loss_sums(model)
    loss_sum = weight = 0.0  # summed on the device: the host reads them once, at the end
    num_bytes = 0.0
    total = -(-rows.num_rows // batch_size)
    for batch in tqdm.tqdm(
        pipeline.eval_batches(rows, batch_size, 0), total=total, desc="bits per byte", disable=None
    ):
        num_bytes += evaluation.target_bytes(batch, token_bytes)
        s, w = sums(params, {k: jnp.asarray(v) for k, v in batch.items()})
        loss_sum, weight = loss_sum + s, weight + w
    loss_sum, weight = float(loss_sum), float(weight)
    return {
        "bits_per_byte": loss_sum / math.log(2) / num_bytes,
        "loss": loss_sum / weight,
        "targets": int(weight),
        "bytes": int(num_bytes),
    }


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the tokenizer's BOS, continuation ids) as lm-evaluation-harness splits a
    pair: trailing whitespace of the context moves to the continuation, and the continuation is
    encode(context + continuation) less its first len(encode(context)) ids."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    bos = tokenizer_lib.bos_prefix(tokenizer) or [tokenizer.bos_id]
    context_ids = bos + tokenizer.encode(stripped)
    whole = bos + tokenizer.encode(stripped + continuation)
    return context_ids, whole[len(context_ids) :]


@functools.partial(jax.jit, static_argnames=("model_cfg",))
def _continuation_logprobs(params, tokens, mask, *, model_cfg):
    """tokens, mask: [batch, width] -> [batch] sums of log p(tokens[t]) over columns where mask[t]."""
    logits = build_model(model_cfg).apply({"params": params}, tokens[:, :-1])  # [batch, width - 1, vocab]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(picked * mask[:, 1:], axis=1)


def continuation_logprobs(
    model_cfg,
    params,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    max_len: int,
    pad_id: int,
    batch: int = 32,
) -> np.ndarray:
    """[n] sums of log p(continuation | context) for (context ids, continuation ids) pairs.

    model_cfg: the model's `ModelConfig`; params its parameters.
    Each sequence context + continuation keeps its last `max_len` + 1 tokens (the context loses
    its left end first) and is right-padded to a multiple of BUCKET columns; sequences go through
    in order of length, `batch` at a time, so each bucket width compiles once.
    """
    sequences, starts = [], []
    for context, continuation in pairs:
        whole = (context + continuation)[-(max_len + 1) :]
        sequences.append(whole)
        starts.append(max(len(whole) - len(continuation), 1))
    out = np.zeros(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(sequences[i]))
    for s in tqdm.tqdm(range(0, len(order), batch), desc="log-likelihoods", leave=False, disable=None):
        ids = order[s : s + batch]
        width = min(-(-max(len(sequences[i]) for i in ids) // BUCKET) * BUCKET, max_len + 1)
        tokens = np.full((batch, width), pad_id, np.int32)
        mask = np.zeros((batch, width), np.float32)
        for row, i in enumerate(ids):
            tokens[row, : len(sequences[i])] = sequences[i]
            mask[row, starts[i] : len(sequences[i])] = 1.0
        values = _continuation_logprobs(params, jnp.asarray(tokens), jnp.asarray(mask), model_cfg=model_cfg)
        out[ids] = np.asarray(values)[: len(ids)]
    return out


def multiple_choice(items: Sequence[dict], logprob_fn: Callable[[list[tuple[str, str]]], np.ndarray]) -> dict:
    """acc and acc_norm of [n] items {"context", "choices": [str], "gold": int}.

    logprob_fn: [(context, choice)] -> [m] log-likelihoods of each choice given its context.
    Returns {"acc", "acc_norm", "num_items"}.
    """
    flat = [(item["context"], choice) for item in items for choice in item["choices"]]
    scores = np.asarray(logprob_fn(flat), np.float64)
    acc = acc_norm = 0
    offset = 0
    for item in items:
        k = len(item["choices"])
        ll = scores[offset : offset + k]
        chars = np.array([max(len(c), 1) for c in item["choices"]], np.float64)
        acc += int(np.argmax(ll) == item["gold"])
        acc_norm += int(np.argmax(ll / chars) == item["gold"])
        offset += k
    n = max(len(items), 1)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "num_items": len(items)}


def graded_choice_items(
    task_names: str | Sequence[str], num: int, seed: int, num_choices: int = 4
) -> list[dict]:
    """The built-in multiple-choice set: [num] held-out graded-task prompts in the default template,
    each with its ideal answer and num_choices - 1 other answers of the same task and length as
    distractors; the gold index cycles through 0..num_choices-1."""
    examples = graded_tasks.make_examples(task_names, 4 * num, seed, "validation")
    by_task: dict[str, list[dict]] = {}
    for e in examples:
        by_task.setdefault(e["task"], []).append(e)
    items = []
    for e in examples:
        if len(items) == num:
            break
        answer = e["response"]
        others = [o["response"] for o in by_task[e["task"]] if len(o["response"]) == len(answer)]
        distractors = list(dict.fromkeys(o for o in others if o != answer))[: num_choices - 1]
        if len(distractors) < num_choices - 1:
            continue
        gold = len(items) % num_choices
        choices = distractors[:gold] + [answer] + distractors[gold:]
        context = sft_data.render_messages({}, [{"role": "user", "content": e["prompt"]}])
        items.append({"context": context, "choices": choices, "gold": gold, "task": e["task"]})
    return items


def kshot_examples(task: str, num: int, k: int, seed: int) -> list[tuple[dict, list[dict]]]:
    """[num] (held-out example, its k shots) of one graded task.

    The shots come from the train split (disjoint from the held-out prompts by construction,
    `graded_tasks.split_of`), taken in turn from a shuffled pool; a candidate whose prompt is the
    test prompt or whose prompt or answer contains the test answer is passed over.
    """
    tests = graded_tasks.make_examples(task, num, seed, "validation")
    pool = graded_tasks.make_examples(task, max(4 * k, 64), seed + 1, "train")
    out, cursor = [], 0
    for test in tests:
        shots: list[dict] = []
        for _ in range(len(pool)):
            if len(shots) == k:
                break
            shot, cursor = pool[cursor % len(pool)], cursor + 1
            if shot["prompt"] != test["prompt"] and test["response"] not in shot["prompt"] + shot["response"]:
                shots.append(shot)
        out.append((test, shots))
    return out


def kshot_messages(test: dict, shots: Sequence[dict]) -> list[dict]:
    """The conversation a k-shot prompt renders: user/assistant turns per shot, then the test prompt."""
    turns = []
    for shot in shots:
        turns += [
            {"role": "user", "content": shot["prompt"]},
            {"role": "assistant", "content": shot["response"]},
        ]
    return turns + [{"role": "user", "content": test["prompt"]}]


def first_line(text: str) -> str:
    """The answer a k-shot completion gives: its text up to the first newline."""
    return text.split("\n", 1)[0]


def kshot_score(
    params,
    model_cfg,
    tokenizer,
    template_cfg,
    task: str,
    k: int,
    *,
    num: int,
    seed: int,
    max_new_tokens: int,
    batch: int = 64,
) -> dict:
    """Mean grader score and exact match of greedy answers to `num` held-out prompts of `task` with
    k shots each; None for both when a prompt does not fit the model's context with max_new_tokens
    (0: the longest ideal answer's tokens + 8).

    Returns {"score", "exact", "num_prompts", "prompt_tokens" (longest)}.
    """
    pairs = kshot_examples(task, num, k, seed)
    if max_new_tokens <= 0:
        max_new_tokens = max(len(tokenizer.encode(t["response"])) for t, _ in pairs) + 8
    prompts = [sft_data.encode_prompt(tokenizer, template_cfg, kshot_messages(t, s)) for t, s in pairs]
    longest = max(map(len, prompts))
    if longest + max_new_tokens > model_cfg.max_seq_len:
        return {"score": None, "exact": None, "num_prompts": num, "prompt_tokens": longest}
    answers = evaluation.greedy_answers(params, model_cfg, tokenizer, prompts, max_new_tokens, batch)
    answers = [first_line(a) for a in answers]
    grades = graded_tasks.grade_batch([t for t, _ in pairs], answers)
    return {"score": grades["score"], "exact": grades["exact"], "num_prompts": num, "prompt_tokens": longest}
