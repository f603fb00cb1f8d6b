"""What the RL tasks share: their prompts, rollout layout, per-token log-probs, scores and evals.

Layout: a rollout is the left-padded prompt `[batch, P]` followed by the sampled response
`[batch, T]`; `[batch, T]` arrays are indexed by response position (the conventions of `lm.rl`),
and the logits and values predicting response token t sit at column P - 1 + t.

Prompts (config.data.source): graded tasks (the oracle, their grader, scores every rollout on
the host), the HH dialogues or the "prompt" of TRL records in config.data.files (no oracle;
evaluation by the reward model's score).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm import evaluation, rl, sampling, saved_model, sharding, trainer
from lm.data import graded_tasks, preferences
from lm.data import sft as sft_data
from lm.errors import ConfigError, DataError
from lm.model import Transformer

REWARDS = ("rm", "oracle")  # what an RL task trains on: the reward model or the grader
SOURCES = ("graded_tasks", "hh", "trl")  # config.data.source: where the prompts come from


def check_source(source: str, reward: str, section: str) -> None:
    """One clear line for a prompt source an RL task cannot use with `reward` (config.<section>.reward)."""
    if reward not in REWARDS:
        raise ConfigError(f"config.{section}.reward={reward!r}: expected one of {REWARDS}")
    if source not in SOURCES:
        raise ConfigError(f"config.data.source={source!r}: {section} takes its prompts from one of {SOURCES}")
    if source != "graded_tasks" and reward == "oracle":
        raise ConfigError(
            f"config.{section}.reward='oracle' needs a grader: the {source!r} prompts "
            f"(config.data.source={source!r}) have none; use reward='rm'"
        )


def validate(config, section: str, group_size: int = 1) -> None:
    """The common checks, then those of an RL task's section (ppo, grpo; `group_size` responses per
    prompt): one ConfigError line."""
    trainer.validate(config)
    cfg, batch_size = config[section], config.train.global_batch_size * group_size
    check_source(config.data.source, cfg.reward, section)
    name = section.upper()
    if not cfg.reward_from:
        raise ConfigError(f"config.{section}.reward_from: {name} needs a reward-model workdir")
    if cfg.minibatches < 1 or batch_size % cfg.minibatches:
        raise ConfigError(
            f"config.{section}.minibatches={cfg.minibatches} must divide the {batch_size} rollouts of an "
            f"iteration (config.train.global_batch_size x {group_size} per prompt)"
        )
    per = batch_size // cfg.minibatches
    if per % config.train.grad_accum:
        raise ConfigError(
            f"config.train.grad_accum={config.train.grad_accum} must divide each {name} minibatch "
            f"(global_batch_size / {section}.minibatches = {per} rollouts)"
        )
    if cfg.temperature <= 0:
        raise ConfigError(f"config.{section}.temperature={cfg.temperature}: {name} samples, it must be > 0")
    for key, low in (("epochs", 1), ("max_new_tokens", 1), ("eval_prompts", 0)):
        if cfg[key] < low:
            raise ConfigError(f"config.{section}.{key}={cfg[key]} must be >= {low}")


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
    `preferences.rl_eval_prompts` held out (sft_data_cfg: the SFT run's config.data). hh and trl:
    the builder's distinct 'train' prompts, and the first `eval_prompts` distinct 'validation' ones
    (`preferences.file_prompts`; for hh each is a whole dialogue up to its last
    "\\n\\nAssistant:", for trl a record's "prompt", a string or a message list), formatted by
    config.template (the SFT run's). Those of more than config.train.seq_len - max_new_tokens
    tokens are skipped and counted. Examples are dicts with 'prompt'.
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
            tokenizer, config.template, preferences.file_prompts(data, split), limit
        )
        if not kept[split]:
            raise DataError(
                f"config.train.seq_len={seq_len}: no {data.source} {split} prompt has at most seq_len - "
                f"max_new_tokens = {limit} tokens ({skipped[split]} longer)"
            )
    info = {"prompt_source": data.source, "num_skipped_too_long": skipped}
    train, held_out = ([{"prompt": p} for p in prompts] for prompts in (kept["train"], kept["validation"]))
    return train, held_out[:eval_prompts], info


def dev_eval_fn(model_cfg, tokenizer, template_cfg, examples: list[dict], max_new_tokens: int, score_fn=None):
    """`params -> {eval_rm_score (with score_fn), eval_grader_score, eval_exact_match, eval_score_<task>
    (graded examples)}` of greedy responses (temperature 0, stop at EOS), generated once, to the
    dev prompts of `examples`. score_fn: as `saved_model.normalised_score_fn`'s."""
    prompts = evaluation.encode_prompts(examples, tokenizer, template_cfg)
    graded = all("task" in e for e in examples)

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
        record = {}
        if score_fn is not None:
            scores = evaluation.rm_scores(score_fn, prompts, responses, pad_id=tokenizer.pad_id)
            record["eval_rm_score"] = float(scores.mean())
        if graded:
            record.update(evaluation.graded_record(examples, evaluation.decode(tokenizer, responses)))
        return record

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


def sample_and_score(policy_params, frozen, batch, rng, *, model, reward_model, settings, cfg, oracle):
    """Samples responses to `batch` from the policy and scores them, on device.

    Args:
      frozen: {'reference', 'reward'} parameters and 'norm' ([2] mean, std of the reward model).
      batch: {'prompts': [B, P], 'lengths': [B], 'index': [B] example index for the oracle}.
      cfg: the task's section (reads max_new_tokens, temperature, reward, missing_eos_penalty).
      oracle: `(index [B], responses [B, T]) -> [B] float32` host grader, or None.
    Returns:
      dict of tokens, positions, segments [B, P + T]; mask, logp, ref_logp, entropy [B, T]; score
      (the training score: the normalised reward model's or the oracle's, minus the missing-EOS
      penalty), rm_score, ended and, with an oracle, oracle_score [B].
    """
    prompts, width = batch["prompts"], batch["prompts"].shape[1]
    responses, _ = sampling.sample_arrays(
        {"params": policy_params},
        prompts,
        batch["lengths"],
        rng,
        settings,
        config=model.config,
        max_new_tokens=cfg.max_new_tokens,
    )
    tokens, positions, segments = sequence_layout(prompts, batch["lengths"], responses)
    mask = rl.response_mask(responses, settings.eos_id)
    layout = (tokens, positions, segments, width)
    logp, entropy = response_logprobs(model, policy_params, *layout, cfg.temperature)
    ref_logp, _ = response_logprobs(model, frozen["reference"], *layout, cfg.temperature)
    raw = final_scores(reward_model, frozen["reward"], *layout, mask)
    out = {
        "tokens": tokens,
        "positions": positions,
        "segments": segments,
        "mask": mask,
        "logp": logp,
        "ref_logp": ref_logp,
        "entropy": entropy,
        "rm_score": (raw - frozen["norm"][0]) / frozen["norm"][1],
        "ended": jnp.any(responses == settings.eos_id, axis=1),
    }
    if oracle is not None:
        shape = jax.ShapeDtypeStruct(raw.shape, jnp.float32)
        out["oracle_score"] = jax.pure_callback(oracle, shape, batch["index"], responses)
    score = out["oracle_score"] if cfg.reward == "oracle" else out["rm_score"]
    out["score"] = score - cfg.missing_eos_penalty * (~out["ended"])
    return out


def rollout_stats(r: dict) -> dict:
    """The logged scalars every RL task shares, of a `sample_and_score` result."""
    valid = jnp.maximum(jnp.sum(r["mask"]), 1.0)
    stats = {
        "rm_score": jnp.mean(r["rm_score"]),
        "entropy": jnp.sum(r["entropy"] * r["mask"]) / valid,
        "response_length": jnp.mean(jnp.sum(r["mask"], axis=1)),
        "eos_fraction": jnp.mean(r["ended"]),
    }
    if "oracle_score" in r:
        stats["oracle_score"] = jnp.mean(r["oracle_score"])
    return stats


@dataclasses.dataclass
class Setting:
    """What an RL run starts from: the SFT policy (`init_from`), the reward model (`reward_from`),
    the resolved config, the prompts and the oracle."""

    config: object  # the resolved config (the user's is never changed)
    resolved: dict  # what was adopted from the SFT run (architecture, template)
    policy: object  # saved_model.SavedModel of the SFT policy
    model: Transformer
    reward_model: object  # lm.heads.RewardModel (also the value model's network)
    reward_params: dict
    reward_norm: dict
    train_examples: list
    eval_examples: list
    prompts: dict  # prompt_batches of the train examples
    info: dict  # for run_info
    settings: sampling.SamplingSettings
    oracle: object  # host_oracle of the train examples, or None (HH and TRL prompts)


def prepare(user_config, section: str) -> Setting:
    """Loads an RL run's models and prompts for the task whose section is `section` ('ppo', ...)."""
    cfg = user_config[section]
    policy = saved_model.load(user_config.init_from)
    reward_model, reward_params, norm, _ = saved_model.restore_reward_model(cfg.reward_from)
    resolved = trainer.adopted(policy.config.to_dict(), user_config)
    config = trainer.resolve(user_config, resolved)
    tok, model_cfg = policy.tokenizer, policy.model_cfg
    train, held_out, info = prompt_examples(
        config,
        tok,
        policy.config.data.to_dict(),
        model_cfg.max_seq_len,
        eval_prompts=cfg.eval_prompts,
        max_new_tokens=cfg.max_new_tokens,
    )
    prompts = prompt_batches(train, tok, config.template, model_cfg, cfg.max_new_tokens)
    info = {
        **info,
        "init_from": os.path.abspath(config.init_from),
        "reward_from": os.path.abspath(cfg.reward_from),
        "num_prompts": len(train),
        "prompt_width": int(prompts["prompts"].shape[1]),
    }
    settings = sampling.SamplingSettings.create(cfg.temperature, 0, 1.0, tok.eos_id, tok.pad_id)
    oracle = host_oracle(train, tok) if config.data.source == "graded_tasks" else None
    return Setting(
        config,
        resolved,
        policy,
        Transformer(model_cfg),
        reward_model,
        reward_params,
        norm,
        train,
        held_out,
        prompts,
        info,
        settings,
        oracle,
    )


def reward_init(reward_model):
    """`rng -> boxed params` of a reward (or value) model (`trainer.Task.init_params` style)."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    return lambda rng: reward_model.init(rng, dummy, dummy[:, 0], dummy[:, 0])["params"]


def frozen_models(r: Setting, policy_sharding, reward_sharding) -> dict:
    """The reference policy and the reward model, placed from host copies (the state is donated
    each step, so frozen arrays must not share its buffers), and the normalisation 'norm' [2]."""
    host = jax.device_get({"reference": r.policy.params, "reward": r.reward_params})
    frozen = jax.device_put(host, {"reference": policy_sharding, "reward": reward_sharding})
    frozen["norm"] = jnp.asarray([r.reward_norm["mean"], r.reward_norm["std"]], jnp.float32)
    return frozen


def held_out_eval(r: Setting, frozen: dict):
    """`(policy params -> eval metrics, the metric best/ keeps)` on the dev prompts: the reward
    model's normalised score of greedy answers, and with a grader their graded score. A policy
    trained on the reward model keeps its best checkpoint by the reward model's score (the grader
    only measures it); one trained on the grader (reward 'oracle') by the graded score. Responses
    are as long as the rollouts' (the prompts leave room for those)."""
    cfg = r.config
    score_fn = saved_model.normalised_score_fn(r.reward_model, frozen["reward"], r.reward_norm)
    evaluate = dev_eval_fn(
        r.policy.model_cfg,
        r.policy.tokenizer,
        cfg.template,
        r.eval_examples,
        cfg[cfg.task].max_new_tokens,
        score_fn,
    )
    return evaluate, "eval_grader_score" if cfg[cfg.task].reward == "oracle" else "eval_rm_score"
