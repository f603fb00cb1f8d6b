"""PPO against a reward model with a per-token KL penalty to the SFT policy (InstructGPT's RL stage).

One train step is one PPO iteration, jitted as a whole: sample a rollout batch with the KV-cache
sampler, score it (policy, reference, value and reward forwards), turn the RM score and the KL
penalty into per-token rewards, GAE advantages, then `ppo.epochs` passes of `ppo.minibatches`
clipped-surrogate + clipped-value updates. The adaptive KL coefficient lives in the state.

Models: policy and frozen reference from the SFT workdir (`init_from`); the frozen reward model
and its normalisation from `ppo.reward_from`; the value model is a copy of the reward model
(backbone + scalar head, read at every position; `value_init`) and trains beside the policy.

Prompts (config.data.source, `prompt_examples`): graded tasks, or the HH dialogues' ('hh'). Where
they come from a graded task, the oracle (the grader) scores every rollout on the host: it is
logged, never trained on unless `ppo.reward = 'oracle'`, and the policy whose greedy answers to
held-out prompts grade best (eval_grader_score) is kept in best/. HH prompts have no oracle: no
oracle_score is logged, and best/ keeps the policy whose greedy responses to held-out
('validation') prompts the reward model scores best (eval_rm_score, normalised).

Conventions of `lm.rl`: `[batch, T]` arrays are indexed by response position; for the
left-padded sequence `prompt [P] + response [T]`, the logits and values predicting response
token t sit at column P - 1 + t.
"""
import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import checkpoint, evaluation, rl, sampling, saved_model, sharding
from lm import metrics as metrics_lib
from lm.data import graded_tasks, pipeline, preferences
from lm.data import sft as sft_data
from lm.errors import ConfigError, DataError
from lm.loop import train_with_evals
from lm.model import Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.tasks import pretrain, reward as reward_task, sft

REWARDS = ("rm", "oracle")
SOURCES = ("graded_tasks", "hh")  # config.data.source: where the prompts come from


@flax.struct.dataclass
class PPOState:
    """A checkpoint: step, params {'policy', 'value'}, opt_state, rng, kl_coef (adaptive β)."""
    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array
    kl_coef: jax.Array


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
    """log π(response token) and the policy entropy at each response position, with the logits
    divided by the sampling temperature (the distribution the rollout drew from).

    Returns:
      (logp, entropy): [batch, T] float32 each.
    """
    logits = model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)
    logits = logits[:, prompt_width - 1:-1] / temperature                # [batch, T, vocab]
    return rl.token_logprobs(logits, tokens[:, prompt_width:]), rl.entropy_from_logits(logits)


def response_values(value_model, params, tokens, positions, segments, prompt_width: int):
    """The value (or reward) head at the positions that predict each response token: [batch, T]."""
    values = value_model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)
    return values[:, prompt_width - 1:-1]


def final_scores(value_model, params, tokens, positions, segments, prompt_width: int, mask):
    """The reward model's score of each sequence, read at its last response token: [batch]."""
    last = prompt_width - 1 + jnp.sum(mask, axis=1).astype(jnp.int32)  # column of the last valid token
    first = jnp.full_like(last, prompt_width)                            # the first response column
    return value_model.apply({"params": params}, tokens, last, first, positions=positions, segment_ids=segments)


def rollout(params, frozen, batch, rng, kl_coef, *, model, value_model, cfg, settings, oracle):
    """Samples responses to `batch` and computes everything the updates need, on device.

    Args:
      params: {'policy', 'value'}; frozen: {'reference', 'reward'} (+ 'norm': [2] mean, std).
      batch: {'prompts': [B, P], 'lengths': [B], 'index': [B] example index for the oracle}.
      oracle: `(index [B], responses [B, T]) -> [B] float32` host grader, or None (no
        oracle_score in the stats).
    Returns:
      (data: dict of [B, T] / [B] arrays, stats: dict of scalars).
    """
    prompts, width = batch["prompts"], batch["prompts"].shape[1]
    responses, _ = sampling.sample_arrays({"params": params["policy"]}, prompts, batch["lengths"], rng,
                                          settings, config=model.config, max_new_tokens=cfg.max_new_tokens)
    tokens, positions, segments = sequence_layout(prompts, batch["lengths"], responses)
    mask = rl.response_mask(responses, settings[3])
    logp, entropy = response_logprobs(model, params["policy"], tokens, positions, segments, width,
                                      cfg.temperature)
    ref_logp, _ = response_logprobs(model, frozen["reference"], tokens, positions, segments, width,
                                    cfg.temperature)
    values = response_values(value_model, params["value"], tokens, positions, segments, width)
    rm_score = (final_scores(value_model, frozen["reward"], tokens, positions, segments, width, mask)
                - frozen["norm"][0]) / frozen["norm"][1]
    oracle_score = (None if oracle is None else
                    jax.pure_callback(oracle, jax.ShapeDtypeStruct(rm_score.shape, jnp.float32),
                                      batch["index"], responses))
    ended = jnp.any(responses == settings[3], axis=1)
    score = oracle_score if cfg.reward == "oracle" else rm_score
    score = score - cfg.missing_eos_penalty * (~ended)
    rewards, kl = rl.kl_penalised_rewards(score, logp, ref_logp, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = rl.whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = rl.whiten(advantages, mask)
    data = {"tokens": tokens, "positions": positions, "segments": segments, "mask": mask, "logp": logp,
            "values": values, "advantages": advantages, "returns": returns}
    valid = jnp.maximum(jnp.sum(mask), 1.0)
    stats = {"reward": jnp.mean(score - kl_coef * kl), "rm_score": jnp.mean(rm_score),
             **({} if oracle is None else {"oracle_score": jnp.mean(oracle_score)}),
             "kl": jnp.mean(kl), "kl_coef": kl_coef,
             "entropy": jnp.sum(entropy * mask) / valid, "response_length": jnp.mean(jnp.sum(mask, axis=1)),
             "eos_fraction": jnp.mean(ended)}
    return jax.lax.stop_gradient(data), stats


def ppo_loss(params, mb, *, model, value_model, cfg, prompt_width: int):
    """Clipped surrogate + vf_coef × clipped value loss − entropy_coef × entropy on a minibatch.

    Returns (loss, stats)."""
    logp, entropy = response_logprobs(model, params["policy"], mb["tokens"], mb["positions"], mb["segments"],
                                      prompt_width, cfg.temperature)
    values = response_values(value_model, params["value"], mb["tokens"], mb["positions"], mb["segments"],
                             prompt_width)
    pg_loss, pg_stats = rl.ppo_policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], cfg.clip)
    vf_loss, vf_stats = rl.value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.value_clip)
    mean_entropy = jnp.sum(entropy * mb["mask"]) / jnp.maximum(jnp.sum(mb["mask"]), 1.0)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
    stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "clip_fraction": pg_stats["clip_fraction"],
             "approx_kl": pg_stats["approx_kl"], "ratio": pg_stats["ratio_mean"], "value_clip_fraction": vf_stats["clip_fraction"],
             "explained_variance": rl.explained_variance(values, mb["returns"], mb["mask"])}
    return loss, stats


def ptx_loss(params, rows, *, model):
    """PPO-ptx: mean next-token loss of the policy on language-model rows ([batch, seq] dict)."""
    loss_sum, aux = pretrain.lm_loss(params["policy"], rows, None, model=model, z_loss=0.0)
    return loss_sum / jnp.maximum(aux["weight"], 1.0)


def ppo_step(state: PPOState, batch, frozen, *, model, value_model, cfg, settings, tx, schedule, oracle):
    """One PPO iteration: rollout, then epochs × minibatches of updates. `(state, batch, frozen) ->
    (state, metrics)`; metrics average the updates' statistics and add the rollout's."""
    rng = jax.random.fold_in(state.rng, state.step)
    data, rollout_stats = rollout(state.params, frozen, batch, jax.random.fold_in(rng, 0), state.kl_coef,
                                  model=model, value_model=value_model, cfg=cfg, settings=settings, oracle=oracle)
    size = data["mask"].shape[0]
    per = size // cfg.minibatches
    width = batch["prompts"].shape[1]

    def minibatch_loss(params, mb, ptx_rows):
        loss, stats = ppo_loss(params, mb, model=model, value_model=value_model, cfg=cfg, prompt_width=width)
        if cfg.ptx_coef:
            ptx = ptx_loss(params, ptx_rows, model=model)
            loss, stats = loss + cfg.ptx_coef * ptx, {**stats, "ptx_loss": ptx}
        return loss, {**stats, "loss": loss}

    def update(carry, index):
        params, opt_state = carry
        mb = jax.tree.map(lambda x: x[index], data)
        ptx_rows = jax.tree.map(lambda x: x[index % x.shape[0]], batch["ptx"]) if cfg.ptx_coef else None
        (_, stats), grads = jax.value_and_grad(minibatch_loss, has_aux=True)(params, mb, ptx_rows)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {**stats, "grad_norm": optax.tree.norm(grads)}

    def epoch(carry, e):
        order = jax.random.permutation(jax.random.fold_in(rng, 1 + e), size)[:per * cfg.minibatches]
        return jax.lax.scan(update, carry, order.reshape(cfg.minibatches, per))

    (params, opt_state), stats = jax.lax.scan(epoch, (state.params, state.opt_state), jnp.arange(cfg.epochs))
    metrics = {k: jnp.mean(v) for k, v in stats.items()}
    metrics.update(rollout_stats, learning_rate=schedule(state.step))
    kl_coef = (rl.adaptive_kl_update(state.kl_coef, rollout_stats["kl"], cfg.kl_target, cfg.kl_horizon, size)
               if cfg.kl_target > 0 else state.kl_coef)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                         kl_coef=kl_coef), metrics


def ppo_optimizer(opt_cfg, policy_schedule, value_schedule) -> optax.GradientTransformation:
    """`make_optimizer` for each of {'policy', 'value'}, with its own learning-rate schedule and its
    own gradient clipping. The two models share no parameter, so under Adam the value loss's
    weight (vf_coef) barely changes the value model's step: its learning rate is what sets it."""
    return optax.multi_transform({"policy": make_optimizer(opt_cfg, policy_schedule),
                                  "value": make_optimizer(opt_cfg, value_schedule)},
                                 {"policy": "policy", "value": "value"})


def value_init(rm_params: dict, norm: dict) -> dict:
    """The value model's starting parameters: the reward model's, its head rescaled to read in the
    units of the normalised reward, (r - mean) / std (InstructGPT's reward model is itself
    normalised by its bias). Read at every position, the value head then starts near the scale
    of the returns instead of the raw head's offset."""
    head = rm_params["head"]
    return {**rm_params, "head": {"kernel": head["kernel"] / norm["std"],
                                  "bias": (head["bias"] - norm["mean"]) / norm["std"]}}


def check_config(cfg, batch_size: int) -> None:
    """One clear line for a PPO setting that cannot work."""
    if cfg.reward not in REWARDS:
        raise ConfigError(f"config.ppo.reward={cfg.reward!r}: expected one of {REWARDS}")
    if not cfg.reward_from:
        raise ConfigError("config.ppo.reward_from: PPO needs a reward-model workdir")
    if cfg.minibatches < 1 or batch_size % cfg.minibatches:
        raise ConfigError(f"config.ppo.minibatches={cfg.minibatches} must divide "
                          f"config.train.global_batch_size={batch_size}")
    if cfg.temperature <= 0:
        raise ConfigError(f"config.ppo.temperature={cfg.temperature}: PPO samples, it must be > 0")
    if cfg.value_lr < 0:
        raise ConfigError(f"config.ppo.value_lr={cfg.value_lr}: expected >= 0 (0: config.optimizer.lr)")


def check_source(source: str, reward: str) -> None:
    """One clear line for a prompt source PPO cannot use with `reward` (config.ppo.reward)."""
    if source not in SOURCES:
        raise ConfigError(f"config.data.source={source!r}: PPO takes its prompts from one of {SOURCES}")
    if source == "hh" and reward == "oracle":
        raise ConfigError("config.ppo.reward='oracle' needs a grader: the HH prompts (config.data.source='hh') "
                          "have none")


def prompt_examples(config, tokenizer, sft_data_cfg: dict, max_seq_len: int) -> tuple[list[dict], list[dict], dict]:
    """(train, eval) prompt examples of config.data.source, and what run_info records about them.

    graded_tasks: config.data.num_train examples of config.data.tasks from the 'train' side and
    `preferences.rl_eval_prompts` held out (sft_data_cfg: the SFT run's config.data). hh: the HH
    builder's distinct 'train' prompts, and the first config.sft.eval_prompts distinct
    'validation' ones; each is a whole dialogue up to its last "\n\nAssistant:", formatted by
    config.template (the SFT run's, as SFT saw it). Those of more than config.train.seq_len -
    config.ppo.max_new_tokens tokens are skipped and counted. Examples are dicts with 'prompt'.
    """
    data = config.data
    if data.source == "graded_tasks":
        train = graded_tasks.make_examples(data.tasks, data.num_train, data.task_seed + 1, "train")
        return train, preferences.rl_eval_prompts(data.tasks, config.sft.eval_prompts, data.task_seed, sft_data_cfg), {}
    seq_len = config.train.seq_len
    if seq_len > max_seq_len:
        raise ConfigError(f"config.train.seq_len={seq_len} exceeds the SFT model's max_seq_len={max_seq_len}")
    limit = seq_len - config.ppo.max_new_tokens
    kept, skipped = {}, {}
    for split in ("train", "validation"):
        kept[split], skipped[split] = sft_data.prompts_that_fit(tokenizer, config.template,
                                                                preferences.hh_prompts(data, split), limit)
        if not kept[split]:
            raise DataError(f"config.train.seq_len={seq_len}: no HH {split} prompt has at most seq_len - "
                            f"config.ppo.max_new_tokens = {limit} tokens ({skipped[split]} longer)")
    info = {"prompt_source": "hh", "num_skipped_too_long": skipped}
    train, held_out = ([{"prompt": p} for p in prompts] for prompts in (kept["train"], kept["validation"]))
    return train, held_out[:config.sft.eval_prompts], info


def rm_eval_fn(model_cfg, tokenizer, template_cfg, examples: list[dict], max_new_tokens: int, score_fn):
    """`params -> {eval_rm_score}`: the mean normalised reward-model score of greedy responses
    (temperature 0, stop at EOS) to the prompts of `examples`, for prompts without a grader.
    score_fn: as `reward.normalised_score_fn`'s."""
    prompts = evaluation.encode_prompts(examples, tokenizer, template_cfg)

    def evaluate(params):
        responses = evaluation.sample_responses(params, model_cfg, prompts, max_new_tokens=max_new_tokens,
                                                rng=jax.random.PRNGKey(0), temperature=0.0, eos_id=tokenizer.eos_id,
                                                pad_id=tokenizer.pad_id, batch=sft.EVAL_BATCH)
        scores = evaluation.rm_scores(score_fn, prompts, responses, pad_id=tokenizer.pad_id)
        return {"eval_rm_score": float(scores.mean())}
    return evaluate


def prompt_batches(examples: list[dict], tokenizer, template_cfg, model_cfg, max_new_tokens: int):
    """Every prompt left-padded to one width: ({'prompts': [n, P], 'lengths': [n]}) numpy."""
    encoded = [sft_data.encode_prompt(tokenizer, template_cfg, e["prompt"]) for e in examples]
    prompts, lengths = sampling.left_pad(encoded, tokenizer.pad_id, model_cfg, max_new_tokens)
    return {"prompts": prompts, "lengths": lengths}


def host_oracle(examples: list[dict], tokenizer):
    """`(index [B], responses [B, T]) -> [B] float32` grader scores, run on the host."""
    def grade(index, responses):
        scores = []
        for i, row in zip(np.asarray(index).tolist(), np.asarray(responses).tolist()):
            row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            ex = examples[i]
            scores.append(graded_tasks.grade(ex["task"], ex["meta"], tokenizer.decode(row))["score"])
        return np.asarray(scores, np.float32)
    return grade


def run(config, workdir: str):
    """PPO from the SFT workdir `config.init_from` against the reward model `config.ppo.reward_from`."""
    cfg, batch_size = config.ppo, config.train.global_batch_size
    check_config(cfg, batch_size)
    check_source(config.data.source, cfg.reward)
    if not config.init_from:
        raise ConfigError("config.init_from: PPO starts from an SFT workdir")
    policy = saved_model.load(config.init_from)
    value_model, rm_params, rm_norm, _ = reward_task.restore_reward_model(cfg.reward_from)
    tok, model_cfg = policy.tokenizer, policy.model_cfg
    sft.adopt_architecture(config, policy.config.to_dict())
    config.template = policy.config.template
    model = Transformer(model_cfg)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    pretrain.check_batch_layout(config.train, mesh)
    pretrain.check_model_layout(model_cfg, mesh)

    train_examples, eval_examples, prompt_info = prompt_examples(config, tok, policy.config.data.to_dict(),
                                                                 model_cfg.max_seq_len)
    prompts = prompt_batches(train_examples, tok, config.template, model_cfg, cfg.max_new_tokens)
    settings = sampling.settings(cfg.temperature, 0, 1.0, tok.eos_id, tok.pad_id)
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    value_schedule = learning_rate_schedule(config.schedule, cfg.value_lr or config.optimizer.lr, config.train.steps)
    tx = ppo_optimizer(config.optimizer, schedule, value_schedule)
    throughput = pretrain.throughput_info(config, model_cfg, mesh)  # measures the peak: outside the mesh

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        dummy = jnp.zeros((1, 8), jnp.int32)
        boxed = jax.eval_shape(lambda r: {"policy": model.init(r, dummy)["params"],
                                          "value": value_model.init(r, dummy, dummy[:, 0], dummy[:, 0])["params"]},
                               jax.random.PRNGKey(0))
        shardings = sharding.tree_shardings(boxed, mesh, rules)
        # Placed from host copies: the state is donated each step, so the frozen models must not
        # share its buffers (placing one device array twice may alias).
        host = jax.device_get({"policy": policy.params, "reward": rm_params})
        params = jax.device_put({"policy": host["policy"], "value": value_init(host["reward"], rm_norm)}, shardings)
        frozen = jax.device_put({"reference": host["policy"], "reward": host["reward"]},
                                {"reference": shardings["policy"], "reward": shardings["value"]})
        frozen["norm"] = jnp.asarray([rm_norm["mean"], rm_norm["std"]], jnp.float32)
        opt_shardings = sharding.tree_shardings(jax.eval_shape(tx.init, boxed), mesh, rules)
        state = PPOState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(params),
                         rng=jax.random.PRNGKey(config.seed), kl_coef=jnp.float32(cfg.kl_coef))
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
        step, restored = checkpoint.restore(mngr, checkpoint.abstract_like(state, state_shardings))
        if restored is not None:
            state = restored
            print(f"resumed from step {step}")

        run_info = {"init_from": os.path.abspath(config.init_from), "reward_from": os.path.abspath(cfg.reward_from),
                    "params": {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()},
                    "num_prompts": len(train_examples), "prompt_width": int(prompts["prompts"].shape[1]),
                    **prompt_info}
        if jax.process_index() == 0:
            tok.save(os.path.join(workdir, "tokenizer"))
            metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"), {**config.to_dict(), "run": run_info})
            print(f"PPO from {config.init_from} against {cfg.reward_from}: {len(train_examples)} prompts, "
                  f"{batch_size} per rollout, {cfg.epochs} epochs x {cfg.minibatches} minibatches")

        batch_sharding = sharding.batch_sharding(mesh, rules)
        graded = config.data.source == "graded_tasks"
        oracle = host_oracle(train_examples, tok) if graded else None
        step_fn = jax.jit(functools.partial(ppo_step, model=model, value_model=value_model, cfg=cfg,
                                            settings=settings, tx=tx, schedule=schedule, oracle=oracle),
                          donate_argnums=0)
        ptx_rows = None
        if cfg.ptx_coef:
            ptx_rows = sft_data.prepare_sft_data(policy.config.data, config.template, tok, config.train.seq_len).train

        vector_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_sharding.spec[0]))
        local = batch_size // jax.process_count()

        def batch_fn(step):
            index = prompt_indices(len(train_examples), step, batch_size, config.seed)
            index = index[jax.process_index() * local:(jax.process_index() + 1) * local]  # this process' rows
            out = sharding.global_batch({"prompts": prompts["prompts"][index]}, batch_sharding)
            out.update(sharding.global_batch({"lengths": prompts["lengths"][index], "index": index}, vector_sharding))
            if ptx_rows is not None:
                out["ptx"] = sharding.global_batch(pipeline.batch_at_step(
                    ptx_rows, step, batch_size, config.seed, jax.process_index(), jax.process_count()), batch_sharding)
            return out

        if graded:
            grade = sft.grader_eval_fn(model_cfg, tok, config.template, eval_examples, config.sft.max_new_tokens)
        else:  # the responses are as long as the rollouts': the prompts leave room for those
            grade = rm_eval_fn(model_cfg, tok, config.template, eval_examples, cfg.max_new_tokens,
                               reward_task.normalised_score_fn(value_model, frozen["reward"], rm_norm))
        evaluate = lambda params: grade(params["policy"])
        keep_best = sft.best_keeper(workdir, "eval_grader_score" if graded else "eval_rm_score", "max",
                                    to_plain=lambda p: p["policy"])
        tokens_per_step = batch_size * (run_info["prompt_width"] + cfg.max_new_tokens)
        # Model FLOPs of one iteration: five forwards (sampling, policy, reference, value, reward;
        # a forward is a third of a training pass) and epochs x (policy + value) training passes.
        flops_per_step = tokens_per_step * throughput["flops_per_token"] * (5 / 3 + 2 * cfg.epochs)
        state = train_with_evals(state, workdir=workdir, eval_fn=evaluate, after_eval=keep_best,
                                 step_fn=lambda s, b: step_fn(s, b, frozen), batch_fn=batch_fn,
                                 train_cfg=config.train, ckpt_mngr=mngr,
                                 meta={"config": config.to_dict(), "run": run_info},
                                 tokens_per_step=tokens_per_step, flops_per_step=flops_per_step,
                                 peak_flops=throughput["peak_flops_per_device"] * jax.device_count())
    return state


def prompt_indices(num: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """[batch_size] prompt indices of rollout `step`: epochs of a seeded permutation (pure in step)."""
    first = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(first + len(out), num)
        order = np.random.default_rng([seed, epoch]).permutation(num)
        out.extend(order[offset:offset + batch_size - len(out)].tolist())
    return np.asarray(out, np.int32)
