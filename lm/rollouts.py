"""What the RL tasks share: their prompts, rollout layout, per-token log-probs, scores and evals.

Layout: a rollout is the left-padded prompt `[batch, P]` followed by the sampled response
`[batch, T]`; `[batch, T]` arrays are indexed by response position (the conventions of `lm.rl`),
and the logits and values predicting response token t sit at column P - 1 + t.

Prompts (config.data.source): graded tasks (the oracle, their grader, scores every rollout on
the host) or the HH dialogues (no oracle; evaluation by the reward model's score).
"""

import jax
import jax.numpy as jnp
import numpy as np

from lm import evaluation, rl, sampling, sharding
from lm.data import graded_tasks, preferences
from lm.data import sft as sft_data
from lm.errors import ConfigError, DataError

REWARDS = ("rm", "oracle")  # what an RL task trains on: the reward model or the grader
SOURCES = ("graded_tasks", "hh")  # config.data.source: where the prompts come from


def check_source(source: str, reward: str, section: str) -> None:
    """One clear line for a prompt source an RL task cannot use with `reward` (config.<section>.reward)."""
    if reward not in REWARDS:
        raise ConfigError(f"config.{section}.reward={reward!r}: expected one of {REWARDS}")
    if source not in SOURCES:
        raise ConfigError(f"config.data.source={source!r}: {section} takes its prompts from one of {SOURCES}")
    if source == "hh" and reward == "oracle":
        raise ConfigError(
            f"config.{section}.reward='oracle' needs a grader: the HH prompts "
            "(config.data.source='hh') have none"
        )


def sequence_layout(prompts, lengths, responses):
    """The full left-padded sequences and their positions / segment ids.

    Args:
      prompts: [batch, P] int32 left-padded; lengths: [batch] real prompt lengths;
      responses: [batch, T] int32.
    Returns:
      (tokens, positions, segment_ids), each [batch, P + T] int32.
    """
    tokens = jnp.concatenate([prompts, responses], axis=1)
    positions, segments = sampling.prompt_layout(lengths, tokens.shape[1], prompts.shape[1])
    return tokens, positions, segments


def response_logprobs(model, params, tokens, positions, segments, prompt_width: int, temperature):
    """log pi(response token) and the policy entropy at each response position, with the logits
    divided by the sampling temperature (the distribution the rollout drew from).

    Returns:
      (logp, entropy): [batch, T] float32 each (every position; mask them with the response mask).
    """
    logits = model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)
    logp = rl.sequence_logprobs(
        logits, tokens, jnp.ones_like(tokens), start=prompt_width - 1, temperature=temperature
    )
    return logp, rl.entropy_from_logits(logits[:, prompt_width - 1 : -1] / temperature)


def response_values(value_model, params, tokens, positions, segments, prompt_width: int):
    """The value (or reward) head at the positions that predict each response token: [batch, T]."""
    values = value_model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)
    return values[:, prompt_width - 1 : -1]


def final_scores(value_model, params, tokens, positions, segments, prompt_width: int, mask):
    """The reward model's score of each sequence, read at its last response token: [batch]."""
    last = prompt_width - 1 + jnp.sum(mask, axis=1).astype(jnp.int32)  # column of the last valid token
    first = jnp.full_like(last, prompt_width)  # the first response column
    return value_model.apply(
        {"params": params}, tokens, last, first, positions=positions, segment_ids=segments
    )


def host_oracle(examples: list[dict], tokenizer):
    """`(index [B], responses [B, T]) -> [B] float32` grader scores, run on the host."""

    def grade(index, responses):
        scores = []
        for i, row in zip(np.asarray(index).tolist(), np.asarray(responses).tolist()):
            row = row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            ex = examples[i]
            scores.append(graded_tasks.grade(ex["task"], ex["meta"], tokenizer.decode(row))["score"])
        return np.asarray(scores, np.float32)

    return grade


def prompt_examples(
    config, tokenizer, sft_data_cfg: dict, max_seq_len: int, *, eval_prompts: int, max_new_tokens: int
) -> tuple[list[dict], list[dict], dict]:
    """(train, eval) prompt examples of config.data.source, and what run_info records about them.

    graded_tasks: config.data.num_train examples of config.data.tasks from the 'train' side and
    `preferences.rl_eval_prompts` held out (sft_data_cfg: the SFT run's config.data). hh: the HH
    builder's distinct 'train' prompts, and the first `eval_prompts` distinct 'validation' ones;
    each is a whole dialogue up to its last "\\n\\nAssistant:", formatted by config.template (the
    SFT run's). Those of more than config.train.seq_len - max_new_tokens tokens are skipped and
    counted. Examples are dicts with 'prompt'.
    """
    data = config.data
    if data.source == "graded_tasks":
        train = graded_tasks.make_examples(data.tasks, data.num_train, data.task_seed + 1, "train")
        return train, preferences.rl_eval_prompts(data.tasks, eval_prompts, data.task_seed, sft_data_cfg), {}
    seq_len = config.train.seq_len
    if seq_len > max_seq_len:
        raise ConfigError(f"config.train.seq_len={seq_len} exceeds the SFT model's max_seq_len={max_seq_len}")
    limit = seq_len - max_new_tokens
    kept, skipped = {}, {}
    for split in ("train", "validation"):
        kept[split], skipped[split] = sft_data.prompts_that_fit(
            tokenizer, config.template, preferences.hh_prompts(data, split), limit
        )
        if not kept[split]:
            raise DataError(
                f"config.train.seq_len={seq_len}: no HH {split} prompt has at most seq_len - "
                f"max_new_tokens = {limit} tokens ({skipped[split]} longer)"
            )
    info = {"prompt_source": "hh", "num_skipped_too_long": skipped}
    train, held_out = ([{"prompt": p} for p in prompts] for prompts in (kept["train"], kept["validation"]))
    return train, held_out[:eval_prompts], info


def rm_eval_fn(model_cfg, tokenizer, template_cfg, examples: list[dict], max_new_tokens: int, score_fn):
    """`params -> {eval_rm_score}`: the mean normalised reward-model score of greedy responses
    (temperature 0, stop at EOS) to the prompts of `examples`, for prompts without a grader.
    score_fn: as `saved_model.normalised_score_fn`'s."""
    prompts = evaluation.encode_prompts(examples, tokenizer, template_cfg)

    def evaluate(params):
        responses = evaluation.sample_responses(
            params,
            model_cfg,
            prompts,
            max_new_tokens=max_new_tokens,
            rng=jax.random.PRNGKey(0),
            temperature=0.0,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            batch=evaluation.GRADER_BATCH,
        )
        scores = evaluation.rm_scores(score_fn, prompts, responses, pad_id=tokenizer.pad_id)
        return {"eval_rm_score": float(scores.mean())}

    return evaluate


def prompt_batches(examples: list[dict], tokenizer, template_cfg, model_cfg, max_new_tokens: int):
    """Every prompt left-padded to one width: ({'prompts': [n, P], 'lengths': [n]}) numpy."""
    encoded = [sft_data.encode_prompt(tokenizer, template_cfg, e["prompt"]) for e in examples]
    prompts, lengths = sampling.left_pad(encoded, tokenizer.pad_id, model_cfg, max_new_tokens)
    return {"prompts": prompts, "lengths": lengths}


def prompt_indices(num: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """[batch_size] prompt indices of rollout `step`: epochs of a seeded permutation (pure in step)."""
    first = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(first + len(out), num)
        order = np.random.default_rng([seed, epoch]).permutation(num)
        out.extend(order[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out, np.int32)


def prompt_batch_fn(prompts: dict, num: int, batch_size: int, seed: int, batch_sharding):
    """`step -> {'prompts': [B, P], 'lengths': [B], 'index': [B]}` global arrays of rollout `step`'s
    prompts (`prompt_indices`), each process giving its own rows."""
    vectors = sharding.vector_sharding(batch_sharding)

    def batch_fn(step):
        index = prompt_indices(num, step, batch_size, seed)[sharding.process_slice(batch_size)]
        out = sharding.global_batch({"prompts": prompts["prompts"][index]}, batch_sharding)
        out.update(sharding.global_batch({"lengths": prompts["lengths"][index], "index": index}, vectors))
        return out

    return batch_fn
