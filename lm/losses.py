"""Token losses, returned as sums so that gradient accumulation and cross-device means are exact.

The caller divides by the summed weight after adding up microbatches or devices.
"""

import jax
import jax.numpy as jnp


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
    """Masked next-token cross-entropy with PaLM's optional z-loss, in float32.

    Per token: `ce = logsumexp(logits) - logits[target]` and `z = z_loss * logsumexp(logits)**2`
    (PaLM, Chowdhery et al. 2022, section 5: keeps the softmax normaliser near 1). As in t5x,
    `loss_sum` is the training objective and already includes the z term; the plain
    cross-entropy sum is `loss_sum - z_loss_sum`.

    Args:
      logits: [batch, seq, vocab] float32 (other float types are upcast).
      targets: [batch, seq] int32 token ids.
      mask: [batch, seq] float weight of each token (0 = ignore).
      z_loss: coefficient of the z-loss; 0 disables it.
    Returns:
      (loss_sum, z_loss_sum, weight_sum): float32 scalars, sums of mask-weighted tokens.
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [batch, seq]
    z_sum = jnp.sum(mask * z_loss * jnp.square(log_z))
    loss_sum = jnp.sum(mask * (log_z - target_logit)) + z_sum
    return loss_sum, z_sum, jnp.sum(mask)


def ranking_loss(scores, ranks, mask, margin: float = 0.0):
    """InstructGPT's reward-model loss over every ranked pair of K responses to a prompt.

    Each ordered pair (w, l) with both slots valid and rank[w] < rank[l] contributes
    `-log sigmoid(s_w - s_l - margin)`; a prompt's loss is the mean over its pairs (InstructGPT,
    Ouyang et al. 2022, eq. 1: weight 1/C(K,2) per prompt, so prompts with many responses do not
    dominate). Ties and masked slots form no pairs; a prompt with no pairs adds 0 to every sum.
    Accuracy is that of the pairs (s_w > s_l), averaged per prompt like the loss, so
    `loss_sum / weight_sum` and `accuracy_sum / weight_sum` are both means over prompts.

    Args:
      scores: [batch, K] float rewards of the K responses (upcast to float32).
      ranks: [batch, K] int, lower = better; equal ranks are ties.
      mask: [batch, K] bool (or 0/1), False for padding slots of prompts with fewer responses.
      margin: subtracted from every score difference (Llama 2's margin term).
    Returns:
      (loss_sum, accuracy_sum, weight_sum): float32 scalars, summed over prompts; weight_sum
      counts the prompts with at least one pair.
    """
    scores = scores.astype(jnp.float32)
    valid = mask.astype(bool)
    diff = scores[:, :, None] - scores[:, None, :]  # [batch, K, K]
    pairs = valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
    # `where`, not a product: padding scores may be anything, even inf.
    pair_loss = jnp.where(pairs, -jax.nn.log_sigmoid(jnp.where(pairs, diff, 0.0) - margin), 0.0)
    correct = jnp.where(pairs, diff > 0, False)
    num_pairs = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)  # [batch]
    per_pair = 1.0 / jnp.maximum(num_pairs, 1.0)
    loss_sum = jnp.sum(per_pair * jnp.sum(pair_loss, axis=(1, 2)))
    accuracy_sum = jnp.sum(per_pair * jnp.sum(correct, axis=(1, 2)))
    return loss_sum, accuracy_sum, jnp.sum(num_pairs > 0).astype(jnp.float32)


def dpo_loss(policy_logp_chosen, policy_logp_rejected, ref_logp_chosen, ref_logp_rejected, beta: float):
    """Direct Preference Optimisation (Rafailov et al. 2023, eq. 7), per example.

    Implicit rewards are `r = beta * (log pi(y|x) - log pi_ref(y|x))`; the loss is
    `-log sigmoid(r_chosen - r_rejected)`, which is log 2 when the policy equals the reference.

    Args:
      policy_logp_chosen, policy_logp_rejected, ref_logp_chosen, ref_logp_rejected: [batch]
        summed log-probabilities of each whole response (float, upcast to float32).
      beta: strength of the implicit KL constraint to the reference.
    Returns:
      (loss, chosen_reward, rejected_reward): [batch] float32 each; sum `loss` for the objective.
    """
    f32 = lambda x: x.astype(jnp.float32)
    chosen_reward = beta * (f32(policy_logp_chosen) - f32(ref_logp_chosen))
    rejected_reward = beta * (f32(policy_logp_rejected) - f32(ref_logp_rejected))
    return -jax.nn.log_sigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward


def next_token_loss(logits, batch, z_loss: float = 0.0):
    """logits: [batch, seq, vocab] of a packed batch (dict of [batch, seq] `targets`, `loss_mask`)
    -> `(loss_sum + z-loss sum, {"weight": tokens counted, "z_loss": z-loss sum})`."""
    loss_sum, z_sum, weight = cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
    return loss_sum + z_sum, {"weight": weight, "z_loss": z_sum}


def lm_loss(params, batch, rng, *, model, z_loss: float = 0.0):
    """`next_token_loss` of a language `model` (`lm.model.build_model`'s) on a packed batch (dict of
    [batch, seq] `inputs`, `positions`, `segment_ids`, `targets`, `loss_mask`); `rng` None: no dropout."""
    logits = model.apply(
        {"params": params},
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    return next_token_loss(logits, batch, z_loss)
