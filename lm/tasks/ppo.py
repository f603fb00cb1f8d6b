"""PPO against a reward model with a per-token KL penalty to the SFT policy (InstructGPT's RL stage).

One train step is one PPO iteration, jitted as a whole: sample a rollout batch with the KV-cache
sampler, score it (policy, reference, value and reward forwards), turn the RM score and the KL
penalty into per-token rewards, GAE advantages, then `ppo.epochs` passes of `ppo.minibatches`
clipped-surrogate + clipped-value updates. The adaptive KL coefficient lives in the state.

Models: policy and frozen reference from the SFT workdir (`init_from`); the frozen reward model
and its normalisation from `ppo.reward_from`; the value model is a copy of the reward model
(backbone + scalar head, read at every position; `value_init`) and trains beside the policy.

Prompts (config.data.source, `rollouts.prompt_examples`): graded tasks, the HH dialogues' or the
"prompt" of TRL records. Where they come from a graded task, the oracle (the grader) scores every
rollout on the host: it is logged, never trained on unless `ppo.reward = 'oracle'`, and the policy
whose greedy answers to held-out prompts grade best (eval_grader_score) is kept in best/. HH and
TRL prompts have no oracle: no oracle_score is logged, and best/ keeps the policy whose greedy
responses to held-out ('validation') prompts the reward model scores best (eval_rm_score,
normalised).

Every `train.*` key means what it means elsewhere: each minibatch update is split into
train.grad_accum microbatches, and an update whose loss or gradient norm is not finite is not
applied and counts as a skipped step (train.on_nonfinite, train.inject_nan_at_step). Layout
conventions: `lm.rollouts`.
"""

import functools

import flax
import jax
import jax.numpy as jnp

from lm import losses, rl, rollouts, trainer
from lm.data import sft as sft_data
from lm.errors import ConfigError
from lm.optim import per_model_optimizer
from lm.train_state import TrainState, minibatch_epochs


@flax.struct.dataclass
class PPOState(TrainState):
    """A TrainState whose params are {'policy', 'value'}, with the adaptive KL coefficient β."""

    kl_coef: jax.Array


def rollout(params, frozen, batch, rng, kl_coef, *, model, value_model, cfg, settings, oracle):
    """Samples and scores responses to `batch` (`rollouts.sample_and_score`), then the value
    model's values, the KL-penalised per-token rewards and GAE advantages, on device.

    Args:
      params: {'policy', 'value'}; frozen: {'reference', 'reward', 'norm'}.
    Returns:
      (data: dict of [B, T] and [B, P + T] arrays the updates read, stats: dict of scalars).
    """
    r = rollouts.sample_and_score(
        params["policy"],
        frozen,
        batch,
        rng,
        model=model,
        reward_model=value_model,
        settings=settings,
        cfg=cfg,
        oracle=oracle,
    )
    layout = (r["tokens"], r["positions"], r["segments"], batch["prompts"].shape[1])
    values = rollouts.response_values(value_model, params["value"], *layout)
    rewards, kl = rl.kl_penalised_rewards(r["score"], r["logp"], r["ref_logp"], r["mask"], kl_coef)
    if cfg.whiten_rewards:
        rewards = rl.whiten(rewards, r["mask"], shift_mean=False)
    advantages, returns = rl.gae(rewards, values, r["mask"], cfg.gamma, cfg.lam)
    data = {key: r[key] for key in ("tokens", "positions", "segments", "mask", "logp")}
    data.update(values=values, advantages=rl.whiten(advantages, r["mask"]), returns=returns)
    stats = {
        **rollouts.rollout_stats(r),
        "reward": jnp.mean(r["score"] - kl_coef * kl),
        "kl": jnp.mean(kl),
        "kl_coef": kl_coef,
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
    width = batch["prompts"].shape[1]

    def minibatch_loss(params, mb, _rng):
        loss, stats = ppo_loss(params, mb, model=model, value_model=value_model, cfg=cfg, prompt_width=width)
        if cfg.ptx_coef:
            ptx = ptx_loss(params, mb["ptx"], model=model)
            loss, stats = loss + cfg.ptx_coef * ptx, {**stats, "ptx_loss": ptx}
        return loss, {**stats, "loss": loss}

    new, metrics = minibatch_epochs(
        state,
        minibatch_loss,
        data,
        rng,
        tx=tx,
        schedule=schedule,
        epochs=cfg.epochs,
        minibatches=cfg.minibatches,
        grad_accum=grad_accum,
        nan_at_step=nan_at_step,
    )
    kl_coef = state.kl_coef
    if cfg.kl_target > 0:
        kl_coef = rl.adaptive_kl_update(
            kl_coef, rollout_stats["kl"], cfg.kl_target, cfg.kl_horizon, data["mask"].shape[0]
        )
    return new.replace(kl_coef=kl_coef), {**metrics, **rollout_stats}


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
    """The common and RL checks (`rollouts.validate`), then PPO's own: one clear line."""
    rollouts.validate(config, "ppo")
    if config.ppo.value_lr < 0:
        raise ConfigError(
            f"config.ppo.value_lr={config.ppo.value_lr}: expected >= 0 (0: config.optimizer.lr)"
        )


def run(user_config, workdir: str):
    """PPO from the SFT workdir `config.init_from` against the reward model `config.ppo.reward_from`."""
    r = rollouts.prepare(user_config, "ppo")
    config, model, value_model = r.config, r.model, r.reward_model
    cfg, batch_size = config.ppo, config.train.global_batch_size
    s = trainer.setup(config)
    trainer.check_model_layout(model.config, s.mesh)
    _, schedule = trainer.optimizer(config)
    _, value_schedule = trainer.optimizer(config, cfg.value_lr or None)
    # The two models share no parameter, so under Adam vf_coef barely changes the value model's
    # step: its own learning rate (ppo.value_lr) is what sets it.
    tx = per_model_optimizer(config.optimizer, {"policy": schedule, "value": value_schedule})
    throughput = trainer.throughput_info(config, model.config, s.mesh)
    policy_init, value_init_fn = trainer.zeros_init(model, (1, 8)), rollouts.reward_init(value_model)
    init_params = lambda rng: {"policy": policy_init(rng), "value": value_init_fn(rng)}

    with s.scope():
        abstract = trainer.abstract_params(init_params, s)
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
        frozen = rollouts.frozen_models(r, shardings["policy"], shardings["value"])
        host = jax.device_get(
            {"policy": r.policy.params, "value": value_init(r.reward_params, r.reward_norm)}
        )
        counts = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in abstract.items()}
        total = sum(counts.values())
        run_info = {
            **throughput,
            **r.info,
            "params": total,
            "trainable_params": total,
            "param_counts": counts,
        }
        trainer.write_run_files(workdir, user_config, r.resolved, run_info, r.policy.tokenizer)
        if jax.process_index() == 0:
            print(
                f"PPO from {config.init_from} against {cfg.reward_from}: {len(r.train_examples)} prompts, "
                f"{batch_size} per rollout, {cfg.epochs} epochs x {cfg.minibatches} minibatches"
            )
        prompt_fn = rollouts.prompt_batch_fn(
            r.prompts, len(r.train_examples), batch_size, config.seed, s.batch_sharding
        )
        batch_fn = prompt_fn
        if cfg.ptx_coef:  # PPO-ptx: the SFT rows beside each rollout batch
            sft_rows = sft_data.prepare_sft_data(
                r.policy.config.data, config.template, r.policy.tokenizer, config.train.seq_len
            ).train
            ptx_fn = trainer.packed_batch_fn(sft_rows, batch_size, config.seed, s.batch_sharding)
            batch_fn = lambda step: {**prompt_fn(step), "ptx": ptx_fn(step)}

        grade, metric = rollouts.held_out_eval(r, frozen)
        tokens_per_step = batch_size * (run_info["prompt_width"] + cfg.max_new_tokens)
        # Model FLOPs of one iteration: five forwards (sampling, policy, reference, value, reward;
        # a forward is a third of a training pass) and epochs x (policy + value) training passes.
        flops_per_step = tokens_per_step * throughput["flops_per_token"] * (5 / 3 + 2 * cfg.epochs)
        step = functools.partial(
            ppo_step, model=model, value_model=value_model, cfg=cfg, settings=r.settings, oracle=r.oracle
        )
        task = trainer.Task(
            init_params=init_params,
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            step=step,
            frozen=frozen,
            start_params=lambda _: jax.device_put(host, shardings),
            eval_fn=lambda p: grade(p["policy"]),
            eval_at_start=True,
            keep_start=False,
            best=(metric, "max"),
            to_plain=lambda p: p["policy"],
            state_cls=PPOState,
            state_extra={"kl_coef": jnp.float32(cfg.kl_coef)},
            tokens_per_step=tokens_per_step,
            flops_per_step=flops_per_step,
        )
        return trainer.fit(s, task, config, workdir, run_info)
