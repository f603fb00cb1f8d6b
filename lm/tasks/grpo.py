"""GRPO (Shao et al. 2024): PPO's clipped objective with group-relative advantages and no value model.

One train step is one iteration, jitted as a whole: each of `train.global_batch_size` prompts is
sampled `grpo.group_size` times with the KV-cache sampler; each response is scored (the reward
model's normalised score, or with `grpo.reward = 'oracle'` the grader's: verifiable rewards) and
its advantage is its score relative to its group's (`rl.group_advantages`: minus the mean, over
the std with `grpo.std_normalise`, which Dr. GRPO (Liu et al. 2025) drops); then `grpo.epochs`
passes of `grpo.minibatches` clipped updates (`rl.grpo_policy_loss`, `loss_norm` token or
sequence). The KL to the reference is the per-token k3 estimate in the loss (`kl_estimator`
'k3'), or the sequence's log-ratio subtracted from the score ('k1', in the reward).

Models, prompts, evaluation and best/ as PPO's (`lm.rollouts`): the policy and frozen reference
from the SFT workdir `init_from`, the frozen reward model from `grpo.reward_from`; best/ keeps the
policy whose greedy answers to held-out prompts grade best (or, for HH and TRL prompts, that the reward
model scores best). Logged like PPO: reward, rm_score, oracle_score, kl, entropy, clip_fraction,
response_length, and zero_variance_fraction (groups whose scores are all equal: no gradient).
"""

import functools

import jax
import jax.numpy as jnp

from lm import rl, rollouts, trainer
from lm.errors import ConfigError
from lm.train_state import minibatch_epochs


def repeat_prompts(batch: dict, group_size: int) -> dict:
    """Each prompt of `batch` ({'prompts': [B, P], 'lengths', 'index': [B]}) `group_size` times in a
    row: [B * group_size, ...]."""
    return {k: jnp.repeat(v, group_size, axis=0) for k, v in batch.items()}


def rollout(params, frozen, batch, rng, *, model, reward_model, cfg, settings, oracle):
    """Samples `cfg.group_size` responses per prompt, scores them and computes their advantages.

    Returns:
      (data: tokens, positions, segments [B G, P + T], mask, logp, ref_logp [B G, T], advantages
      [B G]; stats: dict of scalars).
    """
    r = rollouts.sample_and_score(
        params,
        frozen,
        repeat_prompts(batch, cfg.group_size),
        rng,
        model=model,
        reward_model=reward_model,
        settings=settings,
        cfg=cfg,
        oracle=oracle,
    )
    kl = rl.sequence_kl(r["logp"], r["ref_logp"], r["mask"])  # [B G] sum of log-ratios (k1)
    score = r["score"] - cfg.kl_coef * kl if cfg.kl_estimator == "k1" else r["score"]
    advantages = rl.group_advantages(score, cfg.group_size, cfg.std_normalise)
    data = {key: r[key] for key in ("tokens", "positions", "segments", "mask", "logp", "ref_logp")}
    data["advantages"] = advantages
    stats = {
        **rollouts.rollout_stats(r),
        "reward": jnp.mean(score),
        "kl": jnp.mean(kl),
        "zero_variance_fraction": rl.zero_variance_fraction(score, cfg.group_size),
    }
    return jax.lax.stop_gradient(data), stats


def grpo_loss(params, mb, _rng, *, model, cfg, prompt_width: int):
    """`rl.grpo_policy_loss` of the policy `params` on a minibatch of rollouts: (loss, stats)."""
    logp, entropy = rollouts.response_logprobs(
        model, params, mb["tokens"], mb["positions"], mb["segments"], prompt_width, cfg.temperature
    )
    loss, stats = rl.grpo_policy_loss(
        logp,
        mb["logp"],
        mb["ref_logp"],
        mb["advantages"],
        mb["mask"],
        clip_eps=cfg.clip,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        loss_norm=cfg.loss_norm,
    )
    return loss, {
        "loss": loss,
        "clip_fraction": stats["clip_fraction"],
        "approx_kl": stats["approx_kl"],
        "ratio": stats["ratio_mean"],
    }


def grpo_step(
    state,
    batch,
    frozen,
    *,
    model,
    reward_model,
    cfg,
    settings,
    oracle,
    tx,
    schedule,
    grad_accum: int = 1,
    nan_at_step: int = -1,
):
    """One GRPO iteration: rollout, then epochs x minibatches of guarded updates
    (`train_state.minibatch_epochs`). `(state, batch, frozen) -> (state, metrics)`."""
    rng = jax.random.fold_in(state.rng, state.step)
    data, stats = rollout(
        state.params,
        frozen,
        batch,
        jax.random.fold_in(rng, 0),
        model=model,
        reward_model=reward_model,
        cfg=cfg,
        settings=settings,
        oracle=oracle,
    )
    loss_fn = functools.partial(grpo_loss, model=model, cfg=cfg, prompt_width=batch["prompts"].shape[1])
    state, metrics = minibatch_epochs(
        state,
        loss_fn,
        data,
        rng,
        tx=tx,
        schedule=schedule,
        epochs=cfg.epochs,
        minibatches=cfg.minibatches,
        grad_accum=grad_accum,
        nan_at_step=nan_at_step,
    )
    return state, {**metrics, **stats}


def validate(config) -> None:
    """The common and RL checks (`rollouts.validate`), then GRPO's own: one clear line."""
    cfg = config.grpo
    if cfg.group_size < 2:
        raise ConfigError(
            f"config.grpo.group_size={cfg.group_size} must be >= 2: advantages are relative to a group"
        )
    rollouts.validate(config, "grpo", cfg.group_size)
    if cfg.kl_estimator not in rl.GRPO_KL_ESTIMATORS:
        raise ConfigError(
            f"config.grpo.kl_estimator={cfg.kl_estimator!r}: expected one of {rl.GRPO_KL_ESTIMATORS}"
        )
    if cfg.loss_norm not in rl.GRPO_LOSS_NORMS:
        raise ConfigError(f"config.grpo.loss_norm={cfg.loss_norm!r}: expected one of {rl.GRPO_LOSS_NORMS}")
    if cfg.kl_coef < 0 or cfg.clip <= 0:
        raise ConfigError(
            f"config.grpo.kl_coef={cfg.kl_coef} must be >= 0 and config.grpo.clip={cfg.clip} > 0"
        )


def run(user_config, workdir: str):
    """GRPO from the SFT workdir `config.init_from`, scored by `config.grpo.reward_from` or the grader."""
    r = rollouts.prepare(user_config, "grpo")
    config, model, cfg = r.config, r.model, r.config.grpo
    prompts_per_step = config.train.global_batch_size
    s = trainer.setup(config)
    trainer.check_model_layout(model.config, s.mesh)
    tx, schedule = trainer.optimizer(config)
    throughput = trainer.throughput_info(config, model.config, s.mesh)
    init_params = trainer.zeros_init(model, (1, 8))

    with s.scope():
        abstract = trainer.abstract_params(init_params, s)
        reward_abstract = trainer.abstract_params(rollouts.reward_init(r.reward_model), s)
        frozen = rollouts.frozen_models(
            r,
            jax.tree.map(lambda x: x.sharding, abstract),
            jax.tree.map(lambda x: x.sharding, reward_abstract),
        )
        host = jax.device_get(r.policy.params)
        run_info = {**throughput, **r.info, "rollouts_per_step": prompts_per_step * cfg.group_size}
        trainer.write_run_files(workdir, user_config, r.resolved, run_info, r.policy.tokenizer)
        if jax.process_index() == 0:
            print(
                f"GRPO from {config.init_from} ({cfg.reward} reward): {len(r.train_examples)} prompts, "
                f"{prompts_per_step} x {cfg.group_size} rollouts per step, {cfg.epochs} epochs x "
                f"{cfg.minibatches} minibatches"
            )
        grade, metric = rollouts.held_out_eval(r, frozen)
        tokens_per_step = run_info["rollouts_per_step"] * (run_info["prompt_width"] + cfg.max_new_tokens)
        # Model FLOPs of one iteration: four forwards (sampling, policy, reference, reward; a
        # forward is a third of a training pass) and epochs policy training passes.
        flops_per_step = tokens_per_step * throughput["flops_per_token"] * (4 / 3 + cfg.epochs)
        task = trainer.Task(
            init_params=init_params,
            tx=tx,
            schedule=schedule,
            frozen=frozen,
            batch_fn=rollouts.prompt_batch_fn(
                r.prompts, len(r.train_examples), prompts_per_step, config.seed, s.batch_sharding
            ),
            step=functools.partial(
                grpo_step,
                model=model,
                reward_model=r.reward_model,
                cfg=cfg,
                settings=r.settings,
                oracle=r.oracle,
            ),
            start_params=lambda params: jax.device_put(host, jax.tree.map(lambda x: x.sharding, params)),
            eval_fn=grade,
            eval_at_start=True,
            keep_start=False,
            best=(metric, "max"),
            tokens_per_step=tokens_per_step,
            flops_per_step=flops_per_step,
        )
        return trainer.fit(s, task, config, workdir, run_info)
