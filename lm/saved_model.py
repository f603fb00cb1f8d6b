"""A trained workdir as a plain model: parameters (LoRA merged), model config, tokenizer, config.

Which parameters: 'best' (workdir/best/, kept by SFT and later stages; already plain), 'latest'
(the newest checkpoint in workdir/checkpoints/; LoRA adapters are merged into the frozen base they
were trained on, re-quantised to NF4 first for QLoRA so the merge is the function that was trained),
or 'auto' (best when there is one, else latest). Everything lands on one device.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import checkpoint, lora, sharding, trainer
from lm import metrics as metrics_lib
from lm.data.tokenizer import Tokenizer, load_tokenizer
from lm.errors import CheckpointError, UserError
from lm.heads import RewardModel
from lm.model import ModelConfig, Transformer, build_model

CHOICES = ("auto", "best", "latest")
COMPARISONS_FILE = "comparisons.npz"  # a reward-model workdir's comparisons (DPO trains on them too)
NORM_FILE = "reward_norm.json"  # its normalisation: mean and std of the best model's scores


@dataclasses.dataclass
class SavedModel:
    params: dict
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict
    source: str  # the checkpoint directory the parameters came from


def read_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(the config the run used: its "resolved" section applied, the "run" section) of a training workdir."""
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise UserError(f"--workdir {workdir}: no config.json (not a training workdir?)")
    saved = checkpoint.read_run_config(workdir)
    run = saved.pop("run", {})
    return ml_collections.ConfigDict(saved), run


def _abstract_params(model: nn.Module, config, mesh):
    """(boxed shapes with logical axes, abstract arrays sharded on `mesh`) of `model`'s parameters."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    shardings = sharding.tree_shardings(boxed, mesh, sharding.axis_rules(config.axis_rules))
    return boxed, checkpoint.abstract_like(sharding.unboxed(boxed), shardings)


def _base_and_adapters(workdir: str, config, run: dict, model: Transformer, mesh):
    """(the frozen base as trained on: from the run's init_from, NF4 for QLoRA; the latest adapters)."""
    lora_cfg = lora.from_config(config.lora)
    boxed, abstract = _abstract_params(model, config, mesh)
    base = lora.stored_base(
        checkpoint.restore_params(run.get("init_from") or config.init_from, abstract), config.lora
    )
    adapters_boxed = jax.eval_shape(lambda: lora.init_adapters(jax.random.PRNGKey(0), boxed, lora_cfg))
    adapter_shardings = sharding.tree_shardings(adapters_boxed, mesh, sharding.axis_rules(config.axis_rules))
    adapters = checkpoint.restore_params(
        workdir, checkpoint.abstract_like(sharding.unboxed(adapters_boxed), adapter_shardings)
    )
    return base, adapters


def _merged_latest(workdir: str, config, run: dict, model: Transformer, mesh):
    """Base (from the run's init_from) + the latest adapters, merged."""
    base, adapters = _base_and_adapters(workdir, config, run, model, mesh)
    return lora.merge(base, adapters, lora.from_config(config.lora))


def load_adapters(workdir: str) -> tuple[SavedModel, dict]:
    """A LoRA run's latest checkpoint unmerged, on the first device: (SavedModel whose params are the
    plain base the adapters were trained on (QLoRA's NF4 kernels dequantised), the adapters
    {layer path: {'a': [*in, r], 'b': [r, *out]}} and saved modules as `lora.init_adapters` nests
    them). A run without LoRA is a UserError."""
    config, run = read_config(workdir)
    if not ("lora" in config and config.lora.rank):
        raise UserError(f"--workdir {workdir}: not a LoRA run (config.lora.rank is 0), so it has no adapters")
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model_cfg = trainer.model_config(config, tokenizer.vocab_size)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(config.axis_rules)):
        base, adapters = _base_and_adapters(workdir, config, run, Transformer(model_cfg), mesh)
        base = lora.merge(base, {}, lora.from_config(config.lora))
    source = os.path.join(workdir, "checkpoints")
    return SavedModel(
        params=base, model_cfg=model_cfg, tokenizer=tokenizer, config=config, source=source
    ), adapters


def load(workdir: str, which: str = "auto") -> SavedModel:
    """The plain parameters of `workdir` ('auto' | 'best' | 'latest'), on the first device."""
    if which not in CHOICES:
        raise UserError(f"--checkpoint={which!r}: expected one of {CHOICES}")
    config, run = read_config(workdir)
    if config.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        config.model.attention = "xla"  # the same model; cuDNN's kernel runs on NVIDIA GPUs only
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model_cfg = trainer.model_config(config, tokenizer.vocab_size)
    model = build_model(model_cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    best = os.path.join(workdir, "best")
    if which == "auto":
        which = "best" if os.path.isdir(best) and any(d.isdigit() for d in os.listdir(best)) else "latest"
    lora_rank = config.lora.rank if "lora" in config else 0
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.axis_rules(config.axis_rules)):
        if which == "latest" and lora_rank:
            params = _merged_latest(workdir, config, run, model, mesh)
        else:
            source = best if which == "best" else workdir
            if which == "best" and not os.path.isdir(best):
                raise CheckpointError(f"{workdir}: no best/ checkpoint (only SFT and later stages keep one)")
            params = checkpoint.restore_params(source, _abstract_params(model, config, mesh)[1])
    return SavedModel(
        params=params,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        config=config,
        source=best if which == "best" else os.path.join(workdir, "checkpoints"),
    )


def restore_reward_model(workdir: str):
    """The best reward model of a finished run and its normalisation, on the first device.

    Returns:
      (model: RewardModel, params, norm: {"mean", "std", ...} of workdir/reward_norm.json, config).
    """
    config, _ = read_config(workdir)
    norm = metrics_lib.read_json(os.path.join(workdir, NORM_FILE))
    if norm is None:
        raise CheckpointError(f"{workdir}: no {NORM_FILE} (not a finished reward-model run?)")
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model = RewardModel(
        trainer.model_config(config, tok.vocab_size), likelihood_term=config.reward.likelihood_term
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.axis_rules(config.axis_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        zeros = jnp.zeros((1,), jnp.int32)
        boxed = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), zeros, zeros)["params"]
        )
        abstract = checkpoint.abstract_like(
            sharding.unboxed(boxed), sharding.tree_shardings(boxed, mesh, rules)
        )
        params = checkpoint.restore_params(os.path.join(workdir, "best"), abstract)
    return model, params, norm, config


def load_reward_model(workdir: str):
    """The best reward model of a finished run, normalised as in workdir/reward_norm.json.

    Returns:
      (score_fn, tokenizer, template): score_fn(tokens [batch, seq] int, first_index [batch] int,
      last_index [batch] int) -> [batch] float32 normalised scores, for right-padded sequences
      [BOS] + formatted prompt + response + [EOS] whose response starts at first_index and whose
      EOS is at last_index; template: {"user", "assistant"}, the SFT run's.
    """
    model, params, norm, config = restore_reward_model(workdir)
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    return normalised_score_fn(model, params, norm), tok, dict(config.template)


def normalised_score_fn(model: RewardModel, params, norm: dict):
    """`score_fn(tokens [batch, seq], first_index [batch], last_index [batch]) -> [batch] float32`:
    the reward model's (score - norm['mean']) / norm['std'] of right-padded sequences whose
    response spans columns first_index..last_index (as `load_reward_model`'s)."""
    mean, std = norm["mean"], norm["std"]
    scores = jax.jit(
        lambda p, tokens, first, last: (model.apply({"params": p}, tokens, last, first) - mean) / std
    )

    def score_fn(tokens, first_index, last_index):
        return scores(params, *(jnp.asarray(x, jnp.int32) for x in (tokens, first_index, last_index)))

    return score_fn
