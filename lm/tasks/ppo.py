"""PPO against a reward model with a per-token KL penalty to the SFT policy (InstructGPT's RL stage).

One train step is one PPO iteration, jitted as a whole: sample a rollout batch with the KV-cache
sampler, score it (policy, reference, value and reward forwards), turn the RM score and the KL
penalty into per-token rewards, GAE advantages, then `ppo.epochs` passes of `ppo.minibatches`
clipped-surrogate + clipped-value updates. The adaptive KL coefficient lives in the state.

Models: policy and frozen reference from the SFT workdir (`init_from`); the frozen reward model
and its normalisation from `ppo.reward_from`; the value model is a copy of the reward model
(backbone + scalar head, read at every position; `value_init`) and trains beside the policy.

Prompts (config.data.source, `rollouts.prompt_examples`): graded tasks, or the HH dialogues'. Where
they come from a graded task, the oracle (the grader) scores every rollout on the host: it is
logged, never trained on unless `ppo.reward = 'oracle'`, and the policy whose greedy answers to
held-out prompts grade best (eval_grader_score) is kept in best/. HH prompts have no oracle: no
oracle_score is logged, and best/ keeps the policy whose greedy responses to held-out
('validation') prompts the reward model scores best (eval_rm_score, normalised).

Every `train.*` key means what it means elsewhere: each minibatch update is split into
train.grad_accum microbatches, and an update whose loss or gradient norm is not finite is not
applied and counts as a skipped step (train.on_nonfinite, train.inject_nan_at_step). Layout
conventions: `lm.rollouts`.
"""

import functools
import os

import flax
import jax
import jax.numpy as jnp
import optax

from lm import losses, rl, rollouts, sampling, saved_model, sharding, trainer
from lm.data import pipeline
from lm.data import sft as sft_data
from lm.errors import ConfigError
from lm.evaluation import grader_eval_fn
from lm.model import Transformer
from lm.optim import make_optimizer
from lm.train_state import TrainState, guarded_update, summed_grads


@flax.struct.dataclass
class PPOState(TrainState):
    """A TrainState whose params are {'policy', 'value'}, with the adaptive KL coefficient β."""

    kl_coef: jax.Array


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
    responses, _ = sampling.sample_arrays(
        {"params": params["policy"]},
        prompts,
        batch["lengths"],
        rng,
        settings,
        config=model.config,
        max_new_tokens=cfg.max_new_tokens,
    )
    tokens, positions, segments = rollouts.sequence_layout(prompts, batch["lengths"], responses)
    mask = rl.response_mask(responses, settings.eos_id)
    logp, entropy = rollouts.response_logprobs(
        model, params["policy"], tokens, positions, segments, width, cfg.temperature
    )
    ref_logp, _ = rollouts.response_logprobs(
        model, frozen["reference"], tokens, positions, segments, width, cfg.temperature
    )
    values = rollouts.response_values(value_model, params["value"], tokens, positions, segments, width)
    rm_score = (
        rollouts.final_scores(value_model, frozen["reward"], tokens, positions, segments, width, mask)
        - frozen["norm"][0]
    ) / frozen["norm"][1]
    oracle_score = (
        None
        if oracle is None
        else jax.pure_callback(
            oracle, jax.ShapeDtypeStruct(rm_score.shape, jnp.float32), batch["index"], responses
        )
    )
    ended = jnp.any(responses == settings.eos_id, axis=1)
    score = oracle_score if cfg.reward == "oracle" else rm_score
    score = score - cfg.missing_eos_penalty * (~ended)
    rewards, kl = rl.kl_penalised_rewards(score, logp, ref_logp, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = rl.whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = rl.whiten(advantages, mask)
    data = {
        "tokens": tokens,
        "positions": positions,
        "segments": segments,
        "mask": mask,
        "logp": logp,
        "values": values,
        "advantages": advantages,
        "returns": returns,
    }
    valid = jnp.maximum(jnp.sum(mask), 1.0)
    stats = {
        "reward": jnp.mean(score - kl_coef * kl),
        "rm_score": jnp.mean(rm_score),
        **({} if oracle is None else {"oracle_score": jnp.mean(oracle_score)}),
        "kl": jnp.mean(kl),
        "kl_coef": kl_coef,
        "entropy": jnp.sum(entropy * mask) / valid,
        "response_length": jnp.mean(jnp.sum(mask, axis=1)),
        "eos_fraction": jnp.mean(ended),
    }
    return jax.lax.stop_gradient(data), stats


def ppo_loss(params, mb, *, model, value_model, cfg, prompt_width: int):
    """Clipped surrogate + vf_coef × clipped value loss − entropy_coef × entropy on a minibatch.

    Returns (loss, stats)."""
    logp, entropy = rollouts.response_logprobs(
        model, params["policy"], mb["tokens"], mb["positions"], mb["segments"], prompt_width, cfg.temperature
    )
    values = rollouts.response_values(
        value_model, params["value"], mb["tokens"], mb["positions"], mb["segments"], prompt_width
    )
    pg_loss, pg_stats = rl.ppo_policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], cfg.clip)
    vf_loss, vf_stats = rl.value_loss(values, mb["values"], mb["returns"], mb["mask"], cfg.value_clip)
    mean_entropy = jnp.sum(entropy * mb["mask"]) / jnp.maximum(jnp.sum(mb["mask"]), 1.0)
    loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * mean_entropy
    stats = {
        "policy_loss": pg_loss,
        "value_loss": vf_loss,
        "clip_fraction": pg_stats["clip_fraction"],
        "approx_kl": pg_stats["approx_kl"],
        "ratio": pg_stats["ratio_mean"],
        "value_clip_fraction": vf_stats["clip_fraction"],
        "explained_variance": rl.explained_variance(values, mb["returns"], mb["mask"]),
    }
    return loss, stats


def ptx_loss(params, rows, *, model):
    """PPO-ptx: mean next-token loss of the policy on language-model rows ([batch, seq] dict)."""
    loss_sum, aux = losses.lm_loss(params["policy"], rows, None, model=model)
    return loss_sum / jnp.maximum(aux["weight"], 1.0)


def ppo_step(
    state: PPOState,
    batch,
    frozen,
    *,
    model,
    value_model,
    cfg,
    settings,
    tx,
    schedule,
    oracle,
    grad_accum: int = 1,
    nan_at_step: int = -1,
):
    """One PPO iteration: rollout, then epochs x minibatches of guarded updates (each over
    grad_accum microbatches). `(state, batch, frozen) -> (state, metrics)`; metrics average the
    updates' statistics and add the rollout's; an iteration with a non-finite update counts once
    in skipped_steps."""
    rng = jax.random.fold_in(state.rng, state.step)
    data, rollout_stats = rollout(
        state.params,
        frozen,
        batch,
        jax.random.fold_in(rng, 0),
        state.kl_coef,
        model=model,
        value_model=value_model,
        cfg=cfg,
        settings=settings,
        oracle=oracle,
    )
    if cfg.ptx_coef:
        data = {**data, "ptx": batch["ptx"]}
    size = data["mask"].shape[0]
    per = size // cfg.minibatches
    width = batch["prompts"].shape[1]

    def minibatch_loss(params, mb, _rng):
        loss, stats = ppo_loss(params, mb, model=model, value_model=value_model, cfg=cfg, prompt_width=width)
        if cfg.ptx_coef:
            ptx = ptx_loss(params, mb["ptx"], model=model)
            loss, stats = loss + cfg.ptx_coef * ptx, {**stats, "ptx_loss": ptx}
        return loss, {**stats, "loss": loss}

    def update(carry, index):
        params, opt_state, bad = carry
        mb = jax.tree.map(lambda x: x[index], data)
        loss, stats, grads = summed_grads(minibatch_loss, params, mb, rng, grad_accum)
        loss, stats, grads = jax.tree.map(lambda x: x / grad_accum, (loss, stats, grads))
        params, opt_state, grad_norm, finite = guarded_update(
            tx, grads, loss, params, opt_state, state.step, nan_at_step
        )
        return (params, opt_state, bad | ~finite), {**stats, "grad_norm": grad_norm}

    def epoch(carry, e):
        order = jax.random.permutation(jax.random.fold_in(rng, 1 + e), size)[: per * cfg.minibatches]
        return jax.lax.scan(update, carry, order.reshape(cfg.minibatches, per))

    carry = (state.params, state.opt_state, jnp.zeros((), bool))
    (params, opt_state, bad), stats = jax.lax.scan(epoch, carry, jnp.arange(cfg.epochs))
    skipped = state.skipped_steps + bad.astype(jnp.int32)
    metrics = {k: jnp.mean(v) for k, v in stats.items()}
    metrics.update(rollout_stats, learning_rate=schedule(state.step), skipped_steps=skipped)
    kl_coef = (
        rl.adaptive_kl_update(state.kl_coef, rollout_stats["kl"], cfg.kl_target, cfg.kl_horizon, size)
        if cfg.kl_target > 0
        else state.kl_coef
    )
    return state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=skipped, kl_coef=kl_coef
    ), metrics


def ppo_optimizer(opt_cfg, policy_schedule, value_schedule) -> optax.GradientTransformation:
    """`make_optimizer` for each of {'policy', 'value'}, with its own learning-rate schedule and its
    own gradient clipping. The two models share no parameter, so under Adam the value loss's
    weight (vf_coef) barely changes the value model's step: its learning rate is what sets it."""
    return optax.multi_transform(
        {
            "policy": make_optimizer(opt_cfg, policy_schedule),
            "value": make_optimizer(opt_cfg, value_schedule),
        },
        {"policy": "policy", "value": "value"},
    )


def value_init(rm_params: dict, norm: dict) -> dict:
    """The value model's starting parameters: the reward model's, its head rescaled to read in the
    units of the normalised reward, (r - mean) / std (InstructGPT's reward model is itself
    normalised by its bias). Read at every position, the value head then starts near the scale
    of the returns instead of the raw head's offset."""
    head = rm_params["head"]
    return {
        **rm_params,
        "head": {"kernel": head["kernel"] / norm["std"], "bias": (head["bias"] - norm["mean"]) / norm["std"]},
    }


def validate(config) -> None:
    """The common checks, then one clear line for a PPO setting that cannot work."""
    trainer.validate(config)
    cfg, batch_size = config.ppo, config.train.global_batch_size
    rollouts.check_source(config.data.source, cfg.reward, "ppo")
    if not cfg.reward_from:
        raise ConfigError("config.ppo.reward_from: PPO needs a reward-model workdir")
    if cfg.minibatches < 1 or batch_size % cfg.minibatches:
        raise ConfigError(
            f"config.ppo.minibatches={cfg.minibatches} must divide "
            f"config.train.global_batch_size={batch_size}"
        )
    if (batch_size // cfg.minibatches) % config.train.grad_accum:
        raise ConfigError(
            f"config.train.grad_accum={config.train.grad_accum} must divide each PPO minibatch "
            f"(global_batch_size / ppo.minibatches = {batch_size // cfg.minibatches} rollouts)"
        )
    if cfg.temperature <= 0:
        raise ConfigError(f"config.ppo.temperature={cfg.temperature}: PPO samples, it must be > 0")
    if cfg.value_lr < 0:
        raise ConfigError(f"config.ppo.value_lr={cfg.value_lr}: expected >= 0 (0: config.optimizer.lr)")
    if cfg.epochs < 1 or cfg.max_new_tokens < 1 or cfg.eval_prompts < 0:
        raise ConfigError(
            "config.ppo.epochs and config.ppo.max_new_tokens must be positive, config.ppo.eval_prompts >= 0"
        )


def run(user_config, workdir: str):
    """PPO from the SFT workdir `config.init_from` against the reward model `config.ppo.reward_from`."""
    policy = saved_model.load(user_config.init_from)
    value_model, rm_params, rm_norm, _ = saved_model.restore_reward_model(user_config.ppo.reward_from)
    resolved = trainer.adopted(policy.config.to_dict(), user_config)
    config = trainer.resolve(user_config, resolved)
    cfg, batch_size = config.ppo, config.train.global_batch_size
    tok, model_cfg = policy.tokenizer, policy.model_cfg
    model = Transformer(model_cfg)
    s = trainer.setup(config)
    trainer.check_model_layout(model_cfg, s.mesh)
    train_examples, eval_examples, prompt_info = rollouts.prompt_examples(
        config,
        tok,
        policy.config.data.to_dict(),
        model_cfg.max_seq_len,
        eval_prompts=cfg.eval_prompts,
        max_new_tokens=cfg.max_new_tokens,
    )
    prompts = rollouts.prompt_batches(train_examples, tok, config.template, model_cfg, cfg.max_new_tokens)
    settings = sampling.SamplingSettings.create(cfg.temperature, 0, 1.0, tok.eos_id, tok.pad_id)
    _, schedule = trainer.optimizer(config)
    _, value_schedule = trainer.optimizer(config, cfg.value_lr or None)
    tx = ppo_optimizer(config.optimizer, schedule, value_schedule)
    throughput = trainer.throughput_info(config, model_cfg, s.mesh)
    dummy = jnp.zeros((1, 8), jnp.int32)
    init_params = lambda r: {
        "policy": model.init(r, dummy)["params"],
        "value": value_model.init(r, dummy, dummy[:, 0], dummy[:, 0])["params"],
    }

    with s.scope():
        abstract = trainer.abstract_params(init_params, s)
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
        # Placed from host copies: the state is donated each step, so the frozen models must not
        # share its buffers (placing one device array twice may alias).
        host = jax.device_get({"policy": policy.params, "reward": rm_params})
        frozen = jax.device_put(
            {"reference": host["policy"], "reward": host["reward"]},
            {"reference": shardings["policy"], "reward": shardings["value"]},
        )
        frozen["norm"] = jnp.asarray([rm_norm["mean"], rm_norm["std"]], jnp.float32)
        start = lambda params: jax.device_put(
            {"policy": host["policy"], "value": value_init(host["reward"], rm_norm)}, shardings
        )
        run_info = {
            **throughput,
            "init_from": os.path.abspath(config.init_from),
            "reward_from": os.path.abspath(cfg.reward_from),
            "num_prompts": len(train_examples),
            "params": {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in abstract.items()},
            "prompt_width": int(prompts["prompts"].shape[1]),
            **prompt_info,
        }
        trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
        if jax.process_index() == 0:
            print(
                f"PPO from {config.init_from} against {cfg.reward_from}: {len(train_examples)} prompts, "
                f"{batch_size} per rollout, {cfg.epochs} epochs x {cfg.minibatches} minibatches"
            )
        graded = config.data.source == "graded_tasks"
        prompt_fn = rollouts.prompt_batch_fn(
            prompts, len(train_examples), batch_size, config.seed, s.batch_sharding
        )
        ptx_rows = None
        if cfg.ptx_coef:
            ptx_rows = sft_data.prepare_sft_data(
                policy.config.data, config.template, tok, config.train.seq_len
            ).train

        def batch_fn(step):
            out = prompt_fn(step)
            if ptx_rows is not None:
                out["ptx"] = sharding.global_batch(
                    pipeline.batch_at_step(
                        ptx_rows, step, batch_size, config.seed, jax.process_index(), jax.process_count()
                    ),
                    s.batch_sharding,
                )
            return out

        if graded:
            grade = grader_eval_fn(model_cfg, tok, config.template, eval_examples, cfg.max_new_tokens)
        else:  # the responses are as long as the rollouts': the prompts leave room for those
            grade = rollouts.rm_eval_fn(
                model_cfg,
                tok,
                config.template,
                eval_examples,
                cfg.max_new_tokens,
                saved_model.normalised_score_fn(value_model, frozen["reward"], rm_norm),
            )
        tokens_per_step = batch_size * (run_info["prompt_width"] + cfg.max_new_tokens)
        # Model FLOPs of one iteration: five forwards (sampling, policy, reference, value, reward;
        # a forward is a third of a training pass) and epochs x (policy + value) training passes.
        flops_per_step = tokens_per_step * throughput["flops_per_token"] * (5 / 3 + 2 * cfg.epochs)
        oracle = rollouts.host_oracle(train_examples, tok) if graded else None
        task = trainer.Task(
            init_params=init_params,
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            start_params=start,
            step=functools.partial(
                ppo_step, model=model, value_model=value_model, cfg=cfg, settings=settings, oracle=oracle
            ),
            frozen=frozen,
            eval_fn=lambda params: grade(params["policy"]),
            eval_at_start=True,
            best=("eval_grader_score" if graded else "eval_rm_score", "max"),
            to_plain=lambda p: p["policy"],
            state_cls=PPOState,
            state_extra={"kl_coef": jnp.float32(cfg.kl_coef)},
            tokens_per_step=tokens_per_step,
            flops_per_step=flops_per_step,
        )
        return trainer.fit(s, task, config, workdir, run_info)
