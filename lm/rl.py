"""PPO for RLHF as pure, jit-able functions (Ziegler et al. 2019, lm-human-preferences;
Ouyang et al. 2022; Huang et al. 2024, "The N implementation details of RLHF with PPO").

Alignment: every `[batch, T]` array here is indexed by response position. Column t belongs to
the t-th generated token `response_tokens[:, t]`:
  logp[:, t]    log pi(response_tokens[:, t] | prompt, response_tokens[:, :t]), read from the
                logits at the position that predicts that token (`token_logprobs` below);
  values[:, t]  the value head at that same position: the state before token t is emitted;
  rewards[:, t] the reward for emitting token t; mask[:, t] 1 on tokens through the first EOS.
For a full sequence `seq = prompt + response` run through the model, the logits predicting the
response are `logits[:, len(prompt) - 1 : -1]` and their tokens `seq[:, len(prompt):]`.

Masks are explicit and every statistic ignores masked positions, whatever they hold (inputs are
zeroed with `where` first, so even inf or NaN after EOS reaches neither outputs nor gradients).
Means are over all valid tokens of the batch (token-level, as in lm-human-preferences and TRL).
"""

import jax
import jax.numpy as jnp


def _valid(mask):
    return mask.astype(jnp.float32) > 0


def _zero_masked(x, mask):
    return jnp.where(_valid(mask), x.astype(jnp.float32), 0.0)


def _masked_mean(x, mask):
    return jnp.sum(_zero_masked(x, mask)) / jnp.maximum(jnp.sum(_valid(mask)), 1)


def _masked_var(x, mask):
    """Biased (population) variance over the valid entries, as tf.nn.moments in lm-human-preferences."""
    return _masked_mean(jnp.square(x - _masked_mean(x, mask)), mask)


def token_logprobs(logits, tokens):
    """log pi(token) under the model, in float32.

    Alignment is that of `losses.cross_entropy`'s targets: `logits[:, t]` scores `tokens[:, t]`,
    so pass the model's logits at positions `0..n-2` and the tokens at `1..n-1` of a sequence.

    Args:
      logits: [batch, seq, vocab] float (upcast to float32).
      tokens: [batch, seq] int token ids.
    Returns:
      [batch, seq] float32 `log_softmax(logits)[..., tokens]`.
    """
    logits = logits.astype(jnp.float32)
    token_logit = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return token_logit - jax.nn.logsumexp(logits, axis=-1)


def sequence_logprobs(logits, tokens, mask, *, start: int = 0, temperature: float = 1.0):
    """The one sequence log-prob function: log pi of each scored token of a sequence.

    Contract: `logits` [batch, seq, vocab] are the model's outputs on `tokens` [batch, seq] (any
    padding, left or right, with the positions and segment ids the model was given); the logits at
    column c predict token c + 1; `mask` [batch, seq] is 1 on the tokens to score (column 0 is never
    scored). Only columns from `start` on are computed (the prompt of a prompt + response layout).

    Returns:
      [batch, seq - 1 - start] float32: entry t is log pi(tokens[:, start + t + 1]) under
      logits / temperature where mask is 1 there, else 0. Sum over axis 1 for a sequence's log-prob.
    """
    logp = token_logprobs(logits[:, start:-1] / temperature, tokens[:, start + 1 :])
    return jnp.where(mask[:, start + 1 :] > 0, logp, 0.0)


def entropy_from_logits(logits):
    """Entropy of the softmax of `logits` [batch, seq, vocab] -> [batch, seq] float32 (nats)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def response_mask(response_tokens, eos_id: int):
    """[batch, T] int tokens -> [batch, T] float32 mask: 1 through the first EOS (included), 0 after.

    A response without EOS is valid through its last token.
    """
    is_eos = (response_tokens == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
    return (eos_before == 0).astype(jnp.float32)


def sequence_kl(logp, ref_logp, mask):
    """Sampled KL estimate per response, `sum_t mask * (logp - ref_logp)`: [batch, T] -> [batch]."""
    return jnp.sum(_zero_masked(logp.astype(jnp.float32) - ref_logp.astype(jnp.float32), mask), axis=-1)


def kl_penalised_rewards(score, logp, ref_logp, mask, beta):
    """Per-token PPO rewards: `-beta * (logp - ref_logp)` on every response token, plus the reward
    model's `score` at the last valid token (the EOS, or the last token of an unfinished response).

    Penalties such as Huang et al.'s fixed score for responses without EOS belong in `score`.

    Args:
      score: [batch] float reward-model score of each response.
      logp, ref_logp: [batch, T] float log-probs of the response tokens under policy and reference.
      mask: [batch, T] prefix mask (`response_mask`); an all-zero row gets no score.
      beta: KL coefficient (a scalar, traced or not).
    Returns:
      (rewards [batch, T] float32, zero where masked; kl [batch] float32 = `sequence_kl`).
    """
    per_token_kl = _zero_masked(logp.astype(jnp.float32) - ref_logp.astype(jnp.float32), mask)
    last = jnp.sum(_valid(mask), axis=-1) - 1  # [batch]; -1 if empty
    at_last = jax.nn.one_hot(last, mask.shape[-1], dtype=jnp.float32)  # zero row for -1
    rewards = -beta * per_token_kl + score.astype(jnp.float32)[:, None] * at_last
    return rewards, jnp.sum(per_token_kl, axis=-1)


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) by a reverse `lax.scan` over time.

    `delta_t = r_t + gamma * V_{t+1} - V_t`, `A_t = delta_t + gamma * lam * A_{t+1}`, where values
    (and rewards) at masked positions count as 0, so the value after the last valid token is 0:
    the response ends the episode. Masked positions get advantage and return 0.

    Args:
      rewards, values: [batch, T] float.
      mask: [batch, T] prefix mask.
      gamma, lam: discount and GAE lambda (scalars).
    Returns:
      (advantages, returns): [batch, T] float32; `returns = advantages + values` on valid tokens.
    """
    valid = _valid(mask)
    rewards, values = _zero_masked(rewards, mask), _zero_masked(values, mask)
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards + gamma * next_values - values

    def step(next_advantage, x):
        delta, ok = x
        advantage = jnp.where(ok, delta + gamma * lam * next_advantage, 0.0)
        return advantage, advantage

    _, advantages = jax.lax.scan(
        step, jnp.zeros(rewards.shape[:1], jnp.float32), (deltas.T, valid.T), reverse=True
    )
    advantages = advantages.T
    return advantages, jnp.where(valid, advantages + values, 0.0)


def whiten(x, mask, shift_mean: bool = True):
    """Normalises `x` to unit variance (and zero mean) using the statistics of its valid entries.

    With `shift_mean=False` the mean is added back (lm-human-preferences' `whiten` option, which
    TRL's `whiten_rewards` uses: rewards change scale, not mean). The statistics are over the whole
    array: under jit on a sharded global batch they are global; per device they are not.

    Args:
      x: [batch, T] float.
      mask: [batch, T] float or bool.
      shift_mean: whether the result has mean 0 (True) or keeps the mean of `x` (False).
    Returns:
      [batch, T] float32, 0 at masked positions.
    """
    x = _zero_masked(x, mask)
    mean = _masked_mean(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(_masked_var(x, mask) + 1e-8)
    if not shift_mean:
        whitened += mean
    return jnp.where(_valid(mask), whitened, 0.0)


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    Per token `max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`, `ratio = exp(logp - old_logp)`.
    `approx_kl` is the k3 estimator of KL(old || new), `(ratio - 1) - log ratio` (Schulman's
    "Approximating KL divergence" note: unbiased for samples from the old policy, never negative).

    Args:
      logp: [batch, T] float log-probs under the policy being optimised.
      old_logp: [batch, T] float log-probs under the policy that sampled the responses.
      advantages: [batch, T] float (usually whitened).
      mask: [batch, T] float or bool.
      clip_eps: the clip range epsilon.
    Returns:
      (loss, stats): float32 masked mean over all valid tokens; stats has `clip_fraction` (share
      of tokens where the clipped term is the larger), `approx_kl` and `ratio_mean`.
    """
    log_ratio = _zero_masked(logp.astype(jnp.float32) - old_logp.astype(jnp.float32), mask)
    advantages = _zero_masked(advantages, mask)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    stats = {
        "clip_fraction": _masked_mean(clipped > unclipped, mask),
        "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }
    return _masked_mean(jnp.maximum(unclipped, clipped), mask), stats


def value_loss(values, old_values, returns, mask, clip_eps):
    """Clipped value loss `0.5 * max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)`.

    Args:
      values: [batch, T] float predictions of the value head being optimised.
      old_values: [batch, T] float predictions at rollout time.
      returns: [batch, T] float GAE returns.
      mask: [batch, T] float or bool.
      clip_eps: how far `values` may move from `old_values` before the clipped term takes over.
    Returns:
      (loss, stats): float32 masked mean; stats has `clip_fraction` (share of tokens where the
      clipped error is the larger).
    """
    values, old_values, returns = (_zero_masked(x, mask) for x in (values, old_values, returns))
    clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    unclipped_error = jnp.square(values - returns)
    clipped_error = jnp.square(clipped_values - returns)
    loss = 0.5 * _masked_mean(jnp.maximum(unclipped_error, clipped_error), mask)
    return loss, {"clip_fraction": _masked_mean(clipped_error > unclipped_error, mask)}


def explained_variance(values, returns, mask):
    """`1 - Var[returns - values] / Var[returns]` over valid tokens: 1 is perfect, 0 is no better
    than a constant, negative is worse. [batch, T] each -> float32 scalar; NaN if returns are constant."""
    values, returns = _zero_masked(values, mask), _zero_masked(returns, mask)
    return 1.0 - _masked_var(returns - values, mask) / _masked_var(returns, mask)


def adaptive_kl_update(beta, current_kl, target, horizon, n_steps):
    """Ziegler et al.'s adaptive KL coefficient, one update.

    `e = clip(current_kl / target - 1, -0.2, 0.2)`; `beta * (1 + e * n_steps / horizon)`.

    Args:
      beta: the current KL coefficient.
      current_kl: the measured KL per response (mean of `sequence_kl` over the batch).
      target: the KL per response to steer towards.
      horizon: how many episodes a full correction takes (10000 in lm-human-preferences).
      n_steps: episodes (responses) seen since the last update, usually the rollout batch size.
    Returns:
      The new coefficient (float32 scalar).
    """
    proportional_error = jnp.clip(current_kl / target - 1.0, -0.2, 0.2)
    return jnp.asarray(beta * (1.0 + proportional_error * n_steps / horizon), jnp.float32)


def fixed_kl_update(beta, current_kl, target, horizon, n_steps):
    """The fixed KL coefficient: `adaptive_kl_update`'s signature, returning `beta` unchanged."""
    del current_kl, target, horizon, n_steps
    return jnp.asarray(beta, jnp.float32)


# ---- GRPO (Shao et al. 2024), with Dr. GRPO's corrections (Liu et al. 2025) as options ----------

GRPO_KL_ESTIMATORS = ("k1", "k3")
GRPO_LOSS_NORMS = ("token", "sequence")


def group_advantages(scores, group_size: int, std_normalise: bool = True, eps: float = 1e-4):
    """Group-relative advantages: each response's score minus its group's mean, divided by the
    group's standard deviation (+ eps) when `std_normalise` (GRPO; Dr. GRPO drops the division).

    Args:
      scores: [groups * group_size] float, the responses of one prompt contiguous.
    Returns:
      [groups * group_size] float32; a group whose scores are all equal gets zeros.
    """
    s = scores.astype(jnp.float32).reshape(-1, group_size)
    centred = s - jnp.mean(s, axis=1, keepdims=True)
    if std_normalise:
        centred = centred / (jnp.std(s, axis=1, keepdims=True) + eps)
    return centred.reshape(-1)


def zero_variance_fraction(scores, group_size: int):
    """The fraction of groups whose scores are all equal (they carry no policy gradient)."""
    s = scores.reshape(-1, group_size)
    return jnp.mean(jnp.all(s == s[:, :1], axis=1))


def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref) for tokens sampled from pi:
    exp(ref - logp) - (ref - logp) - 1 (Schulman's note; never negative). [batch, T] float32."""
    d = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    return jnp.exp(d) - d - 1.0


def grpo_policy_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_eps: float,
    kl_coef: float,
    kl_estimator: str = "k3",
    loss_norm: str = "token",
):
    """GRPO's clipped objective as a loss, with the k3 KL penalty in the loss (`kl_estimator`
    'k3'; with 'k1' the KL is in the reward instead and nothing is added here).

    Per token: `max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) + kl_coef * k3`, A the
    response's advantage. `loss_norm` 'token': the mean over every valid token of the batch (long
    responses weigh more, Dr. GRPO / DAPO); 'sequence': the mean over each response's tokens, then
    over responses (the original GRPO).

    Args:
      logp, old_logp, ref_logp: [batch, T] float; advantages: [batch] float; mask: [batch, T].
    Returns:
      (loss, stats): stats has clip_fraction, approx_kl (k3 of old to new) and ratio_mean.
    """
    mask = mask.astype(jnp.float32)
    log_ratio = _zero_masked(logp.astype(jnp.float32) - old_logp.astype(jnp.float32), mask)
    ratio = jnp.exp(log_ratio)
    a = advantages.astype(jnp.float32)[:, None]
    unclipped = -a * ratio
    clipped = -a * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_token = jnp.maximum(unclipped, clipped)
    if kl_estimator == "k3":
        per_token = per_token + kl_coef * _zero_masked(k3_kl(logp, ref_logp), mask)
    per_token = _zero_masked(per_token, mask)
    if loss_norm == "token":
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
    else:
        lengths = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        loss = jnp.mean(jnp.sum(per_token, axis=1) / lengths)
    stats = {
        "clip_fraction": _masked_mean(clipped > unclipped, mask),
        "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }
    return loss, stats
