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
    log_z = jax.nn.logsumexp(logits, axis=-1)                                        # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [batch, seq]
    z_sum = jnp.sum(mask * z_loss * jnp.square(log_z))
    loss_sum = jnp.sum(mask * (log_z - target_logit)) + z_sum
    return loss_sum, z_sum, jnp.sum(mask)
