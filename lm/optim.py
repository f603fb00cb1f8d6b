"""The optimizer: AdamW with a weight-decay mask, global-norm clipping and a learning-rate schedule.

Gradient accumulation is not here: it is a `lax.scan` over microbatches inside the train step
(lm/train_state.py), so the optimizer sees one exact mean gradient per step.
"""

import jax
import optax

from lm.errors import ConfigError

# Parameter names (the last path entry) that weight decay never touches.
_NEVER_DECAYED = ("bias", "scale")
_EMBEDDINGS = ("embedding",)


def learning_rate_schedule(schedule_cfg, peak_lr: float, total_steps: int) -> optax.Schedule:
    """Warmup then cosine, warmup-stable-decay (linear decay over the last `decay_fraction`), or constant.

    The schedule ends at `total_steps`, the run's own budget: a cycle longer than the run would leave
    the learning rate high at the end (Chinchilla's correction to Kaplan et al.).
    """
    fraction = float(schedule_cfg.get("warmup_fraction", 0.0))
    warmup = round(fraction * total_steps) if fraction > 0 else int(schedule_cfg.warmup_steps)
    warmup = min(warmup, total_steps)
    final_lr = peak_lr * float(schedule_cfg.min_lr_ratio)
    ramp = optax.linear_schedule(0.0, peak_lr, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    kind = schedule_cfg.kind
    if kind == "cosine":
        tail = optax.cosine_decay_schedule(peak_lr, rest, alpha=final_lr / peak_lr if peak_lr else 0.0)
    elif kind == "wsd":
        decay = max(int(rest * float(schedule_cfg.decay_fraction)), 1)
        tail = optax.join_schedules(
            [optax.constant_schedule(peak_lr), optax.linear_schedule(peak_lr, final_lr, decay)],
            [rest - decay],
        )
    elif kind == "constant":
        tail = optax.constant_schedule(peak_lr)
    else:
        raise ConfigError(f"config.schedule.kind={kind!r}: expected 'cosine', 'wsd' or 'constant'")
    return optax.join_schedules([ramp, tail], [warmup])


def weight_decay_mask(params, decay_embeddings: bool = False):
    """A tree of bools: True for the weights AdamW decays (kernels; embeddings if asked)."""

    def decays(path, _):
        name = getattr(path[-1], "key", str(path[-1]))
        if name in _EMBEDDINGS:
            return decay_embeddings
        return name not in _NEVER_DECAYED

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW with masked weight decay, after clipping the global gradient norm to `clip_norm`."""
    adamw = optax.adamw(
        schedule,
        b1=opt_cfg.b1,
        b2=opt_cfg.b2,
        eps=opt_cfg.eps,
        weight_decay=opt_cfg.weight_decay,
        mask=lambda params: weight_decay_mask(params, opt_cfg.decay_embeddings),
    )
    if opt_cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), adamw)
    return adamw


def per_model_optimizer(opt_cfg, schedules: dict) -> optax.GradientTransformation:
    """`make_optimizer` for each top-level key of the params ({'policy': schedule, 'value': ...}),
    each with its own learning-rate schedule and its own gradient clipping."""
    return optax.multi_transform(
        {name: make_optimizer(opt_cfg, s) for name, s in schedules.items()},
        {name: name for name in schedules},
    )
