"""Comparing policies on held-out prompts: oracle and reward-model scores, win rates, KL to SFT, best-of-n.

Definitions (those of the recipe report):
- oracle score: the task's grader on one greedy answer per prompt (graded tasks only);
- rm score: the reward model's normalised score of one greedy answer per prompt;
- win rate of a policy against SFT: mean over prompts of 1 when its oracle score beats SFT's on
  that prompt, 1/2 on a tie, 0 otherwise; the interval is a paired bootstrap over prompts;
- kl_to_sft: mean over prompts of the sequence KL sum_t log pi(y_t) - log pi_SFT(y_t) of responses
  y sampled from the policy at temperature 1, in nats (a Monte-Carlo estimate of KL(pi || pi_SFT));
- best-of-n: the SFT policy's n samples at temperature 1, the reward model picks one; its KL to
  SFT is the analytic log n - (n - 1) / n (Stiennon et al. 2020), exact for distinct samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import losses, rl, sampling, sharding
from lm.data import graded_tasks, pipeline, preferences
from lm.data import sft as sft_data
from lm.model import build_model

GRADER_BATCH = 128  # prompts per sampler call of the grader eval


def encode_prompts(examples: list[dict], tokenizer, template_cfg) -> list[list[int]]:
    """[n] examples -> [n] token lists [BOS] (as the tokenizer adds one) + formatted prompt."""
    return [sft_data.encode_prompt(tokenizer, template_cfg, e["prompt"]) for e in examples]


def sample_responses(
    params,
    model_cfg,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    rng,
    temperature: float,
    eos_id: int,
    pad_id: int,
    batch: int = 256,
) -> list[list[int]]:
    """[n] prompts -> [n] responses (token lists ending at EOS when there is one), `batch` at a
    time in order of length (`sampling.generate_sorted`)."""
    return sampling.generate_sorted(
        {"params": params},
        model_cfg,
        prompts,
        max_batch=batch,
        max_new_tokens=max_new_tokens,
        rng=rng,
        temperature=temperature,
        eos_id=eos_id,
        pad_id=pad_id,
    )


def decode(tokenizer, responses: list[list[int]]) -> list[str]:
    """Response token lists -> text, EOS dropped."""
    return [tokenizer.decode([t for t in r if t != tokenizer.eos_id]) for r in responses]


def oracle_scores(examples: list[dict], answers: list[str]) -> np.ndarray:
    """[n] grader scores of `answers` to `examples`."""
    return np.array([graded_tasks.grade(e["task"], e["meta"], a)["score"] for e, a in zip(examples, answers)])


def win_rate(scores: np.ndarray, baseline: np.ndarray, *, num_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Paired win rate of `scores` [n] over `baseline` [n]: {"win_rate", "win_rate_ci" [lo, hi] (95%,
    bootstrap over prompts), "tie_rate"}."""
    wins = np.where(scores > baseline, 1.0, np.where(scores == baseline, 0.5, 0.0))
    draws = np.random.default_rng(seed).integers(0, len(wins), (num_bootstrap, len(wins)))
    means = wins[draws].mean(axis=1)
    return {
        "win_rate": float(wins.mean()),
        "win_rate_ci": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "tie_rate": float(np.mean(scores == baseline)),
    }


def sequence_logprobs(
    model_cfg,
    params,
    prompts: list[list[int]],
    responses: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    width: int,
) -> np.ndarray:
    """[n] sums of log pi(response tokens | prompt) (temperature 1), teacher-forced; responses are
    padded to `width` tokens (the sampler's max_new_tokens) and counted through their first EOS."""
    tokens, lengths = sampling.left_pad(prompts, pad_id, model_cfg, width)
    padded = np.full((len(responses), width), pad_id, np.int32)
    for i, r in enumerate(responses):
        padded[i, : len(r)] = r
    return np.asarray(
        _sequence_logprobs(
            params,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            jnp.asarray(padded),
            model_cfg=model_cfg,
            eos_id=eos_id,
        )
    )


def _sequence_logprobs_impl(params, prompts, lengths, responses, *, model_cfg, eos_id: int):
    tokens = jnp.concatenate([prompts, responses], axis=1)
    positions, segments = sampling.prompt_layout(lengths, tokens.shape[1], prompts.shape[1])
    logits = build_model(model_cfg).apply(
        {"params": params}, tokens, positions=positions, segment_ids=segments
    )
    width = prompts.shape[1]
    mask = jnp.pad(rl.response_mask(responses, eos_id), ((0, 0), (width, 0)))
    return jnp.sum(rl.sequence_logprobs(logits, tokens, mask, start=width - 1), axis=1)


_sequence_logprobs = jax.jit(_sequence_logprobs_impl, static_argnames=("model_cfg", "eos_id"))


def kl_to_reference(
    model_cfg,
    params,
    ref_params,
    prompts,
    responses,
    *,
    pad_id: int,
    eos_id: int,
    width: int,
    batch: int = 256,
) -> float:
    """Mean over prompts of sum_t log pi(y_t) - log pi_ref(y_t) for responses y sampled from pi."""
    kls = []
    for s in range(0, len(prompts), batch):
        args = (prompts[s : s + batch], responses[s : s + batch])
        kw = dict(pad_id=pad_id, eos_id=eos_id, width=width)
        kls.append(
            sequence_logprobs(model_cfg, params, *args, **kw)
            - sequence_logprobs(model_cfg, ref_params, *args, **kw)
        )
    return float(np.mean(np.concatenate(kls)))


def best_of_n_kl(n: int) -> float:
    """The KL of best-of-n sampling to the sampling policy: log n - (n - 1) / n nats."""
    return math.log(n) - (n - 1) / n


def rm_scores(
    score_fn, prompts: list[list[int]], responses: list[list[int]], *, pad_id: int, batch: int = 256
) -> np.ndarray:
    """[n] reward-model scores of prompt i + response i (float64), read at each response's last token
    (its EOS when it has one).

    Args:
      score_fn: `(tokens [b, seq], first_index [b], last_index [b]) -> [b]` scores of right-padded
        sequences whose response spans columns first_index..last_index (`saved_model.load_reward_model`).
      prompts, responses: [n] token lists each; a response has at least one token.
      batch: sequences per score_fn call, in order of length (`preferences.in_length_order`): all
        at once would hold [n, seq, vocab] logits where the RM has a likelihood term.
    """
    sequences = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, sequences))
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    first = np.array([len(p) for p in prompts], np.int32)
    last = np.array([len(s) - 1 for s in sequences], np.int32)
    call = lambda ids, columns: score_fn(tokens[ids, :columns], first[ids], last[ids])
    return preferences.in_length_order(call, last + 1, batch, width)


def best_of_n(
    score_fn, prompts: list[list[int]], candidates: list[list[list[int]]], *, pad_id: int, batch: int = 256
) -> list[int]:
    """For each prompt, the index of the candidate response the reward model scores highest.

    Args:
      score_fn, batch: as `rm_scores`'.
      prompts: [n] token lists; candidates: [n][k] response token lists.
    """
    k = len(candidates[0])
    scores = rm_scores(
        score_fn,
        [p for p, group in zip(prompts, candidates) for _ in group],
        [r for group in candidates for r in group],
        pad_id=pad_id,
        batch=batch,
    )
    return np.argmax(scores.reshape(len(prompts), k), axis=1).tolist()


def lm_eval_fn(model, rows, batch_size: int, num_batches: int, token_bytes, batch_sharding):
    """`params -> {eval_loss, eval_bits_per_byte}` of a language `model` over fixed held-out batches
    of packed `rows` (`pipeline.eval_batches`; num_batches 0: all). Bits per byte divide the summed
    loss by the bytes the predicted targets stand for (`token_bytes` [vocab]), so losses compare
    across tokenizers."""
    local = list(
        pipeline.eval_batches(rows, batch_size, num_batches, jax.process_index(), jax.process_count())
    )
    num_bytes = _sum_over_processes(sum(target_bytes(b, token_bytes) for b in local))
    batches = [sharding.global_batch(b, batch_sharding) for b in local]
    sums = lm_loss_sums(model)

    def evaluate(params):
        loss_sum = weight = 0.0
        for batch in batches:
            s, w = sums(params, batch)
            loss_sum, weight = loss_sum + s, weight + w
        loss_sum, weight = float(loss_sum), float(weight)
        return {"eval_loss": loss_sum / weight, "eval_bits_per_byte": loss_sum / math.log(2) / num_bytes}

    return evaluate


def lm_loss_sums(model):
    """A jitted `(params, batch) -> (summed next-token loss in nats, number of targets)` of a
    language `model` on one packed batch (dict of [batch, seq] arrays, `losses.lm_loss`)."""

    @jax.jit
    def sums(params, batch):
        loss_sum, aux = losses.lm_loss(params, batch, None, model=model)
        return loss_sum, aux["weight"]

    return sums


def target_bytes(batch: dict, token_bytes: np.ndarray) -> float:
    """The UTF-8 bytes the predicted targets of a packed batch stand for: sum over targets [batch,
    seq] with loss_mask of token_bytes [vocab] (BOS is never a target; EOS stands for 0 bytes)."""
    return float((token_bytes[batch["targets"]] * batch["loss_mask"]).sum())


def _sum_over_processes(x: float) -> float:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return float(np.sum(multihost_utils.process_allgather(np.float64(x))))


def grader_eval_fn(model_cfg, tokenizer, template_cfg, examples: list[dict], max_new_tokens: int):
    """`params -> {eval_grader_score, eval_exact_match, eval_score_<task>, eval_exact_<task>}`.

    Greedy answers (temperature 0, stop at EOS) to the held-out prompts of `examples`, graded by
    each task's programmatic grader; the prompts go through the sampler in batches of similar length.
    """
    prompts = encode_prompts(examples, tokenizer, template_cfg)

    def evaluate(params):
        return graded_record(examples, greedy_answers(params, model_cfg, tokenizer, prompts, max_new_tokens))

    return evaluate


def greedy_answers(
    params, model_cfg, tokenizer, prompts: list[list[int]], max_new_tokens: int, max_batch: int = GRADER_BATCH
) -> list[str]:
    """[n] prompt token lists -> [n] greedy answers (temperature 0, stopped at EOS) as text, EOS
    dropped; the prompts go through the sampler `max_batch` at a time in batches of similar length."""
    outs = sampling.generate_sorted(
        {"params": params},
        model_cfg,
        prompts,
        max_batch=max_batch,
        max_new_tokens=max_new_tokens,
        rng=jax.random.PRNGKey(0),
        temperature=0.0,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    return decode(tokenizer, outs)


def graded_record(examples: list[dict], answers: list[str]) -> dict:
    """The eval metrics of [n] answers to [n] graded examples: eval_grader_score, eval_exact_match,
    eval_score_<task>, eval_exact_<task>."""
    grades = graded_tasks.grade_batch(examples, answers)
    record = {"eval_grader_score": grades.pop("score"), "eval_exact_match": grades.pop("exact")}
    record.update({f"eval_{k}": v for k, v in grades.items()})
    return record
