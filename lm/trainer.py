"""The one trainer core every task runs on.

A task (a leaf module in lm/tasks/) prepares what is its own (data, the model, how its state starts
from `init_from`, its loss or whole step, its batches, its evals) into a `Task`, and `fit` does the
rest the same way for every task: the mesh and axis rules, the optimizer state created sharded,
config.json and the tokenizer in the workdir, the checkpoint manager, resume, the jitted step
(gradient accumulation, the non-finite policy and fault injection included), evaluation cadence,
keeping the best parameters, metrics, the progress bar and preemption. So every `train.*` key means
the same in every task.

The user's config is never changed: what a run resolves (steps from a FLOP budget, the architecture
and template adopted from `init_from`) is a nested dict applied to a copy (`resolve`) and written
beside the user's keys in config.json under "resolved"; `checkpoint.read_run_config` merges it back.
"""

import copy
import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm import checkpoint, flops, lora, sharding
from lm import metrics as metrics_lib
from lm.data import pipeline
from lm.errors import ConfigError
from lm.loop import train_loop
from lm.model import ModelConfig
from lm.optim import learning_rate_schedule, make_optimizer
from lm.train_state import TrainState, init_state, jit_step, train_step

# Model keys that are the run's own, not the architecture: a later stage does not adopt them.
RUN_ONLY_MODEL_KEYS = ("dropout", "remat", "attention")


def model_config(config, vocab_size: int) -> ModelConfig:
    """The frozen model dataclass from config.model and config.precision (vocab 0: the tokenizer's)."""
    fields = config.model.to_dict()
    fields["vocab_size"] = fields["vocab_size"] or vocab_size
    if fields["vocab_size"] < vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {vocab_size}"
        )
    return ModelConfig(
        **fields, dtype=config.precision.compute_dtype, param_dtype=config.precision.param_dtype
    )


def _positive(config, *keys) -> None:
    for key in keys:
        section, name = key.split(".")
        if config[section][name] <= 0:
            raise ConfigError(f"config.{key}={config[section][name]} must be positive")


def validate(config) -> None:
    """The checks of the sections every training task reads: one ConfigError naming the first bad key."""
    _positive(
        config,
        "train.steps",
        "train.global_batch_size",
        "train.seq_len",
        "train.grad_accum",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
    )
    t = config.train
    if t.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.train.seq_len={t.seq_len} exceeds config.model.max_seq_len={config.model.max_seq_len}"
        )
    if not 0 <= config.schedule.warmup_fraction < 1:
        raise ConfigError(
            f"config.schedule.warmup_fraction={config.schedule.warmup_fraction} must be in [0, 1)"
        )
    model_config(config, vocab_size=1)  # the model's own checks, before any data is prepared
    kind = config.model.get("kind", "transformer")
    if kind != "transformer" and config.task != "pretrain":
        raise ConfigError(
            f"config.model.kind={kind!r}: a {config.task} run needs a transformer "
            "(an NNLM trains in pretraining only)"
        )
    if "lora" in config:
        lora.from_config(config.lora)
    metrics_lib.check_wandb(config.get("logging"))
    if t.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config.train.on_nonfinite={t.on_nonfinite!r}: expected 'stop' or 'skip'")
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(
            f"config.train.global_batch_size={t.global_batch_size} is not divisible by "
            f"config.train.grad_accum={t.grad_accum}"
        )
    if "init_from" in config and config.task != "pretrain" and not config.init_from:
        raise ConfigError(f"config.init_from: a {config.task} run starts from an earlier stage's workdir")


def check_batch_layout(train_cfg, mesh) -> None:
    """The global batch (and each microbatch) must split evenly over the batch axes and processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = train_cfg.global_batch_size // train_cfg.grad_accum
    if micro % shards:
        raise ConfigError(
            f"config.train.global_batch_size={train_cfg.global_batch_size} (over "
            f"grad_accum={train_cfg.grad_accum}) is not divisible by the data axes "
            f"data*fsdp={shards}"
        )
    if train_cfg.global_batch_size % jax.process_count():
        raise ConfigError(
            f"config.train.global_batch_size={train_cfg.global_batch_size} is not "
            f"divisible by the {jax.process_count()} processes"
        )


def check_model_layout(model_cfg: ModelConfig, mesh) -> None:
    """Every model dimension the default axis rules shard must divide by its mesh axis."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    dims = [
        ("vocab_size", model_cfg.vocab_size, "tensor", tensor),
        ("num_heads", model_cfg.num_heads, "tensor", tensor),
        ("num_kv_heads", model_cfg.kv_heads, "tensor", tensor),
        ("d_ff", model_cfg.d_ff, "tensor", tensor),
        ("d_model", model_cfg.d_model, "fsdp", fsdp),
    ]
    if model_cfg.kind == "nnlm":  # its hidden units are MLP in H and EMBED in U
        dims = [dims[0], dims[-1]] + [
            ("nnlm_hidden", model_cfg.nnlm_hidden, "tensor", tensor),
            ("nnlm_hidden", model_cfg.nnlm_hidden, "fsdp", fsdp),
        ]
    for name, size, axis, ways in dims:
        if size % ways:
            hint = " (0 takes the tokenizer's; set a multiple to pad it)" if name == "vocab_size" else ""
            raise ConfigError(
                f"config.model.{name}={size} is not divisible by config.mesh.{axis}={ways}{hint}"
            )


def resolve(config, resolved: dict) -> ml_collections.ConfigDict:
    """A copy of `config` with the nested dict `resolved` ({'train': {'steps': 40}, ...}) applied."""
    out = copy.deepcopy(config)
    with out.unlocked():
        for section, values in resolved.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    out[section][key] = tuple(value) if isinstance(value, list) else value
            else:
                out[section] = values
    return out


def adopted(saved: dict, config) -> dict:
    """What a stage adopts from the run it starts from (`saved`: that run's config.json, resolved):
    the architecture (config.model minus RUN_ONLY_MODEL_KEYS) and, where it has one, the template."""
    kind = saved["model"].get("kind", "transformer")
    if kind != "transformer":
        raise ConfigError(
            f"config.init_from={config.get('init_from')!r} is a run of config.model.kind={kind!r}: "
            f"a {config.task} run needs a transformer"
        )
    out = {
        "model": {
            k: v for k, v in saved["model"].items() if k not in RUN_ONLY_MODEL_KEYS and k in config.model
        }
    }
    if "template" in config and "template" in saved:
        out["template"] = dict(saved["template"])
    return out


def preview_adopted(config) -> dict:
    """What `--print_config` can resolve for a stage after pretraining: what it adopts from
    init_from (`adopted`), where that run can be read; else nothing."""
    try:
        return adopted(checkpoint.pretrained_run(config.init_from)[1], config)
    except Exception:
        return {}


def packed_batch_fn(rows, batch_size: int, seed: int, batch_sharding):
    """`step -> the global batch` of packed rows (`pipeline.batch_at_step`: a pure function of
    (seed, step)), each process giving its own rows."""

    def batch_fn(step):
        local = pipeline.batch_at_step(rows, step, batch_size, seed, jax.process_index(), jax.process_count())
        return sharding.global_batch(local, batch_sharding)

    return batch_fn


def throughput_info(config, model_cfg: ModelConfig, mesh) -> dict:
    """What MFU is computed from: parameter counts, training FLOPs per token (PaLM convention) and
    the peak FLOP/s per device with its source; plus the devices and mesh. Call it outside the mesh
    (the peak may be measured). `params` is the model's total, `param_counts` its parts
    (`flops.param_counts`), `trainable_params` what the optimizer updates (all, unless the task
    freezes a base and says otherwise)."""
    peak, source = flops.peak_flops_per_device(config.train.peak_flops, model_cfg.dtype)
    counts = flops.param_counts(model_cfg)
    return {
        "params": counts["total"],
        "trainable_params": counts["total"],
        "param_counts": counts,
        "flops_per_token": flops.flops_per_token(model_cfg, config.train.seq_len),
        "peak_flops_per_device": peak,
        "peak_flops_source": source,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "mesh": dict(mesh.shape),
    }


def optimizer(config, peak_lr: float | None = None):
    """`(tx, schedule)`: AdamW (config.optimizer) on config.schedule over config.train.steps,
    peaking at `peak_lr` (default config.optimizer.lr)."""
    schedule = learning_rate_schedule(config.schedule, peak_lr or config.optimizer.lr, config.train.steps)
    return make_optimizer(config.optimizer, schedule), schedule


@dataclasses.dataclass
class Setup:
    """The mesh a run trains on: create with `setup(config)`, build inside `with s.scope():`."""

    mesh: Any
    rules: tuple
    batch_sharding: Any

    def scope(self):
        """The context every array of the run is created and stepped in (mesh and axis rules)."""
        return _Scope(self.mesh, self.rules)


class _Scope:
    def __init__(self, mesh, rules):
        self._mesh = jax.set_mesh(mesh)
        self._rules = nn.logical_axis_rules(rules)

    def __enter__(self):
        self._mesh.__enter__()
        self._rules.__enter__()
        return self

    def __exit__(self, *exc):
        self._rules.__exit__(*exc)
        return self._mesh.__exit__(*exc)


def setup(config) -> Setup:
    """The mesh and axis rules of config.mesh and config.axis_rules; checks the batch splits over them."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    check_batch_layout(config.train, mesh)
    return Setup(mesh, rules, sharding.batch_sharding(mesh, rules))


@dataclasses.dataclass
class Task:
    """What a task plugs into `fit`.

    Exactly one of `loss_fn` (the core's step: `(params, batch, rng[, frozen]) -> (loss_sum, aux)`,
    aux with `weight`) and `step` (a whole step: `(state, batch, frozen, *, tx, schedule,
    grad_accum, nan_at_step) -> (state, metrics)`, which must update through
    `train_state.guarded_update` and count `skipped_steps`) is set.
    """

    init_params: Callable  # rng -> boxed params (a Flax init: shapes and logical axes)
    batch_fn: Callable[[int], dict]  # step -> the global batch (sharded arrays), a pure function of step
    tx: optax.GradientTransformation
    schedule: Callable
    tokens_per_step: int
    flops_per_step: float
    loss_fn: Callable | None = None
    step: Callable | None = None
    start_params: Callable | None = None  # random-init params -> params of a fresh run (None: kept)
    frozen: Any = None  # arrays the step reads and never updates (LoRA base, PPO's models)
    eval_fn: Callable | None = None  # params -> {eval_...: float}
    eval_at_start: bool = False  # evaluate the starting parameters, logged at step 0
    keep_start: bool = True  # the starting parameters are a candidate for best/ (False: a stage whose
    # kept checkpoint must be trained: RL policies, whose baseline SFT is; a reward model, whose start
    # is SFT's likelihood)
    best: tuple | None = None  # (metric, 'max' | 'min'): keep the best parameters in workdir/best/
    to_plain: Callable = lambda params: params  # the plain model parameters best/ keeps
    step_tokens: Callable | None = None  # step -> tokens, where batches differ in width
    state_cls: type = TrainState
    state_extra: dict = dataclasses.field(default_factory=dict)


def best_keeper(workdir: str, key: str, mode: str = "max", to_plain=lambda params: params):
    """`(step, state, record) -> None` saving `to_plain(state.params)` to workdir/best/ whenever
    `record[key]` beats the best so far (`mode` 'max' or 'min'; the best survives restarts in
    best/<step>/meta)."""
    mngr = checkpoint.manager(workdir, keep=1, subdir="best")
    step = mngr.latest_step()
    best = {"score": None if step is None else checkpoint.restore_meta(mngr, step).get(key)}
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)

    def keep(step, state, record):
        if key in record and (best["score"] is None or better(record[key], best["score"])):
            best["score"] = record[key]
            checkpoint.save(mngr, step, {"params": to_plain(state.params)}, {key: record[key], "step": step})

    return keep


def write_run_files(workdir: str, user_config, resolved: dict, run_info: dict, tokenizer) -> None:
    """config.json (the user's config, "resolved" and "run") and the tokenizer, from process 0."""
    if jax.process_index() != 0:
        return
    if tokenizer is not None:
        tokenizer.save(os.path.join(workdir, "tokenizer"))
    metrics_lib.write_json_atomic(
        os.path.join(workdir, "config.json"), {**user_config.to_dict(), "resolved": resolved, "run": run_info}
    )


def _jit_step(task: Task, config, state_shardings, batch_shardings, frozen_shardings, mesh):
    t = config.train
    if task.step is not None:
        step = functools.partial(
            task.step,
            tx=task.tx,
            schedule=task.schedule,
            grad_accum=t.grad_accum,
            nan_at_step=t.inject_nan_at_step,
        )
    else:
        step = functools.partial(
            train_step,
            loss_fn=task.loss_fn,
            tx=task.tx,
            schedule=task.schedule,
            grad_accum=t.grad_accum,
            nan_at_step=t.inject_nan_at_step,
        )
    compiled = jit_step(step, state_shardings, batch_shardings, frozen_shardings, mesh)
    if task.frozen is None:
        return compiled
    return lambda state, batch: compiled(state, batch, task.frozen)


def fit(s: Setup, task: Task, config, workdir: str, run_info: dict):
    """Trains (or resumes) `task` in `workdir` under the resolved `config`; returns the final state.

    Call inside `s.scope()`, after `write_run_files`. A fresh run starts from `task.start_params`
    (random init when None) and, with `task.eval_at_start`, evaluates them at step 0; a run with a
    checkpoint in workdir/checkpoints/ resumes from its newest, bit for bit.
    """
    state, state_shardings = init_state(
        task.init_params, task.tx, config.seed, s.mesh, s.rules, state_cls=task.state_cls, **task.state_extra
    )
    mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
    step, restored = checkpoint.restore(mngr, checkpoint.abstract_like(state, state_shardings))
    if restored is not None:
        state = restored
        print(f"resumed from step {step}")
    elif task.start_params is not None:
        params = task.start_params(state.params)
        opt_state = jax.jit(task.tx.init, out_shardings=state_shardings.opt_state)(params)
        state = state.replace(params=params, opt_state=opt_state)
    first_batch = task.batch_fn(int(state.step)) if int(state.step) < config.train.steps else None
    batch_shardings = None if first_batch is None else jax.tree.map(lambda x: x.sharding, first_batch)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, task.frozen)
    step_fn = _jit_step(task, config, state_shardings, batch_shardings, frozen_shardings, s.mesh)
    keep_best = None if task.best is None else best_keeper(workdir, *task.best, to_plain=task.to_plain)
    writer = metrics_lib.MetricsWriter(
        workdir, resume_step=int(state.step), logging_cfg=config.get("logging")
    )
    error = None
    try:
        if task.eval_at_start and int(state.step) == 0 and task.eval_fn is not None:
            record = task.eval_fn(state.params)
            writer.write(0, record)
            if keep_best is not None and task.keep_start:
                keep_best(0, state, record)
        return train_loop(
            state,
            step_fn=step_fn,
            batch_fn=task.batch_fn,
            eval_fn=task.eval_fn,
            train_cfg=config.train,
            ckpt_mngr=mngr,
            meta={"config": config.to_dict(), "run": run_info},
            writer=writer,
            tokens_per_step=task.tokens_per_step,
            flops_per_step=task.flops_per_step,
            peak_flops=run_info["peak_flops_per_device"] * jax.device_count(),
            after_eval=keep_best,
            step_tokens=task.step_tokens,
        )
    except BaseException as e:
        error = e
        raise
    finally:
        writer.close(error)


def summary(workdir: str, task: str, seconds: float, next_command: str = "") -> str:
    """The lines a run ends with: what was trained, the final train and eval figures, tokens/s and
    MFU (means over the logged intervals after the first, which includes compilation), wall-clock,
    the workdir and the next command to try."""
    records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    saved = metrics_lib.read_json(os.path.join(workdir, "config.json")) or {}
    size = saved.get("run", {}).get("params")
    size = size if isinstance(size, int) else None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    timed = [r for r in train if r.get("step", 0) > 1 and "tokens_per_sec" in r] or train
    lines = [f"{task} finished in {seconds / 60:.1f} min" + (f" ({size:,} parameters)" if size else "")]
    if train:
        last = train[-1]
        lines.append(f"  train: loss {last['loss']:.4f} at step {last['step']}")
    if evals:
        last = evals[-1]
        shown = {k: v for k, v in last.items() if k.startswith("eval_") and isinstance(v, float)}
        main = [
            k
            for k in (
                "eval_loss",
                "eval_bits_per_byte",
                "eval_accuracy",
                "eval_grader_score",
                "eval_rm_score",
            )
            if k in shown
        ] or sorted(shown)[:4]
        lines.append(f"  eval (step {last['step']}): " + ", ".join(f"{k[5:]} {shown[k]:.4f}" for k in main))
    if timed and "tokens_per_sec" in timed[-1]:
        rate = np.mean([r["tokens_per_sec"] for r in timed])
        mfu = np.mean([r["mfu"] for r in timed if "mfu" in r])
        lines.append(f"  throughput: {rate:,.0f} tokens/s, MFU {mfu:.3f}")
    lines.append(f"  workdir: {workdir} (metrics.jsonl, config.json, checkpoints/)")
    if next_command:
        lines.append(f"  next: {next_command}")
    return "\n".join(lines)


def abstract_params(init_params, s: Setup):
    """`jax.ShapeDtypeStruct`s with shardings of the parameters `init_params` creates (no arrays)."""
    boxed = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    return checkpoint.abstract_like(sharding.unboxed(boxed), sharding.tree_shardings(boxed, s.mesh, s.rules))


def restore_like(path: str, params):
    """The parameters saved at `path` (a workdir, its checkpoints/ or best/, or one step's
    directory), restored into the shapes and shardings of `params`."""
    return checkpoint.restore_params(
        path, checkpoint.abstract_like(params, jax.tree.map(lambda x: x.sharding, params))
    )


def zeros_init(model, *shapes):
    """`rng -> boxed params` of a Flax `model` on int32 zeros of `shapes` (the Task's init_params)."""
    return lambda rng: model.init(rng, *(jnp.zeros(shape, jnp.int32) for shape in shapes))["params"]
