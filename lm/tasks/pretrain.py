"""Pretraining: next-token prediction on packed documents. Data -> model -> step -> loop -> outputs."""
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint, flops, losses, sampling, sharding
from lm import metrics as metrics_lib
from lm.data import pipeline
from lm.errors import ConfigError
from lm.loop import train_loop
from lm.model import ModelConfig, Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.train_state import init_state, jit_train_step


def model_config(config, vocab_size: int) -> ModelConfig:
    """The frozen model dataclass from config.model and config.precision (vocab 0: the tokenizer's)."""
    fields = config.model.to_dict()
    fields["vocab_size"] = fields["vocab_size"] or vocab_size
    if fields["vocab_size"] < vocab_size:
        raise ConfigError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the "
                          f"tokenizer's {vocab_size}")
    return ModelConfig(**fields, dtype=config.precision.compute_dtype,
                       param_dtype=config.precision.param_dtype)


def lm_loss(params, batch, rng, *, model: Transformer, z_loss: float):
    """Summed next-token cross-entropy over `batch` (dict of `[batch, seq]` arrays).

    Returns `(loss_sum, {"weight": tokens counted, "z_loss": z-loss sum})`.
    """
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], deterministic=rng is None,
                         rngs=None if rng is None else {"dropout": rng})
    return loss_from_logits(logits, batch, z_loss)


def loss_from_logits(logits, batch, z_loss: float):
    """logits: [batch, seq, vocab] -> `(loss_sum + z-loss sum, {"weight", "z_loss"})` over the loss mask."""
    loss_sum, z_sum, weight = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)
    return loss_sum + z_sum, {"weight": weight, "z_loss": z_sum}


def eval_sums(params, batch, *, model: Transformer):
    """`(loss_sum, tokens)` over a held-out batch, without dropout or z-loss."""
    loss_sum, aux = lm_loss(params, batch, None, model=model, z_loss=0.0)
    return loss_sum, aux["weight"]


def check_batch_layout(train_cfg, mesh) -> None:
    """The global batch (and each microbatch) must split evenly over the batch axes and processes."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = train_cfg.global_batch_size // train_cfg.grad_accum
    if micro % shards:
        raise ConfigError(f"config.train.global_batch_size={train_cfg.global_batch_size} (over "
                          f"grad_accum={train_cfg.grad_accum}) is not divisible by the data axes "
                          f"data*fsdp={shards}")
    if train_cfg.global_batch_size % jax.process_count():
        raise ConfigError(f"config.train.global_batch_size={train_cfg.global_batch_size} is not "
                          f"divisible by the {jax.process_count()} processes")


def check_model_layout(model_cfg: ModelConfig, mesh) -> None:
    """Every model dimension the default axis rules shard must divide by its mesh axis."""
    tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
    dims = [("vocab_size", model_cfg.vocab_size, "tensor", tensor), ("num_heads", model_cfg.num_heads, "tensor", tensor),
            ("num_kv_heads", model_cfg.kv_heads, "tensor", tensor), ("d_ff", model_cfg.d_ff, "tensor", tensor),
            ("d_model", model_cfg.d_model, "fsdp", fsdp)]
    for name, size, axis, ways in dims:
        if size % ways:
            hint = " (0 takes the tokenizer's; set a multiple to pad it)" if name == "vocab_size" else ""
            raise ConfigError(f"config.model.{name}={size} is not divisible by config.mesh.{axis}={ways}{hint}")


def make_eval_fn(eval_step, rows, batch_size, num_batches, token_bytes, batch_sharding):
    """`params -> {eval_loss, eval_bits_per_byte}` over a fixed set of held-out batches."""
    local = list(pipeline.eval_batches(rows, batch_size, num_batches, jax.process_index(),
                                       jax.process_count()))
    # Bytes the predicted targets stand for, so losses compare across tokenizers (all processes).
    num_bytes = sum(float((token_bytes[b["targets"]] * b["loss_mask"]).sum()) for b in local)
    num_bytes = float(jax.device_get(_sum_over_processes(num_bytes)))
    batches = [sharding.global_batch(b, batch_sharding) for b in local]

    def evaluate(params):
        loss_sum = weight = 0.0
        for batch in batches:
            s, w = eval_step(params, batch)
            loss_sum, weight = loss_sum + s, weight + w
        loss_sum, weight = float(loss_sum), float(weight)
        return {"eval_loss": loss_sum / weight, "eval_bits_per_byte": loss_sum / math.log(2) / num_bytes}
    return evaluate


def _sum_over_processes(x: float) -> float:
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils
    return float(np.sum(multihost_utils.process_allgather(np.float64(x))))


def write_samples(workdir, params, model_cfg, tokenizer, train_cfg, seed) -> list[str]:
    """Generates `num_samples` continuations of the sample prompt, prints and saves them."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(train_cfg.sample_prompt)
    outs = sampling.generate({"params": params}, model_cfg, [prompt] * train_cfg.num_samples,
                             max_new_tokens=train_cfg.sample_tokens, rng=jax.random.PRNGKey(seed),
                             temperature=0.8, top_k=40, top_p=0.95, eos_id=tokenizer.eos_id,
                             pad_id=tokenizer.pad_id)
    texts = [train_cfg.sample_prompt + tokenizer.decode([t for t in o if t != tokenizer.eos_id]) for o in outs]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "samples.txt"), "w") as f:
            for i, text in enumerate(texts):
                block = f"--- sample {i} ---\n{text}\n"
                print(block, end="")
                f.write(block)
    return texts


def throughput_info(config, model_cfg: ModelConfig, mesh) -> dict:
    """What MFU is computed from: parameter counts, training FLOPs per token (PaLM convention) and
    the peak FLOP/s per device with its source; plus the devices and mesh."""
    peak, source = flops.peak_flops_per_device(config.train.peak_flops, model_cfg.dtype)
    return {"params": flops.param_counts(model_cfg),
            "flops_per_token": flops.flops_per_token(model_cfg, config.train.seq_len),
            "peak_flops_per_device": peak, "peak_flops_source": source, "num_devices": jax.device_count(),
            "num_processes": jax.process_count(), "mesh": dict(mesh.shape)}


def scaling_info(config, model_cfg: ModelConfig) -> dict:
    """The run's D (tokens trained) and C (training FLOPs, counted by `config.scaling.flops`)."""
    tokens = config.train.steps * config.train.global_batch_size * config.train.seq_len
    per_token = flops.flops_per_token(model_cfg, config.train.seq_len, config.scaling.flops)
    return {"flops_method": config.scaling.flops, "budget": config.scaling.budget,
            "flops_per_token": per_token, "tokens": tokens, "compute": per_token * tokens}


def run(config, workdir: str):
    """Trains (or resumes) a language model in `workdir`; returns the final train state."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    check_batch_layout(config.train, mesh)
    data = pipeline.prepare_data(config.data, config.tokenizer, config.train.seq_len)
    tok = data.tokenizer
    model_cfg = model_config(config, tok.vocab_size)
    check_model_layout(model_cfg, mesh)
    if jax.process_index() == 0:
        tok.save(os.path.join(workdir, "tokenizer"))
    model = Transformer(model_cfg)
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    if config.scaling.budget > 0:
        config.train.steps = flops.steps_for_budget(model_cfg, seq_len, batch_size * seq_len,
                                                    config.scaling.budget, config.scaling.flops)
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    run_info = {**throughput_info(config, model_cfg, mesh), "data": data.info,
                "scaling": scaling_info(config, model_cfg)}
    counts, peak, peak_source = run_info["params"], run_info["peak_flops_per_device"], run_info["peak_flops_source"]
    if jax.process_index() == 0:
        metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"),
                                      {**config.to_dict(), "run": run_info})
        print(f"model: {counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding); "
              f"data: {data.info.get('source')} {data.train.num_tokens:,} train tokens; "
              f"mesh {dict(mesh.shape)}; peak {peak / 1e9:.0f} GFLOP/s/device ({peak_source})")

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init_params = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
        state, state_shardings = init_state(init_params, tx, config.seed, mesh, rules)
        mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
        step, restored = checkpoint.restore(mngr, checkpoint.abstract_like(state, state_shardings))
        if restored is not None:
            state = restored
            print(f"resumed from step {step}")
        batch_sharding = sharding.batch_sharding(mesh, rules)
        loss_fn = functools.partial(lm_loss, model=model, z_loss=config.train.z_loss)
        step_fn = jit_train_step(loss_fn, tx, schedule, config.train.grad_accum, state_shardings,
                                 batch_sharding, mesh, nan_at_step=config.train.inject_nan_at_step)

        def batch_fn(step):
            rows = pipeline.batch_at_step(data.train, step, batch_size, config.seed,
                                          jax.process_index(), jax.process_count())
            return sharding.global_batch(rows, batch_sharding)

        compiled = step_fn.lower(state, batch_fn(int(state.step))).compile()
        eval_step = jax.jit(functools.partial(eval_sums, model=model))
        evaluate = make_eval_fn(eval_step, data.eval, batch_size, config.train.eval_batches,
                                tok.token_bytes(), batch_sharding)
        writer = metrics_lib.MetricsWriter(workdir, resume_step=int(state.step))
        try:
            state = train_loop(state, step_fn=compiled, batch_fn=batch_fn, eval_fn=evaluate,
                               train_cfg=config.train, ckpt_mngr=mngr, meta={"config": config.to_dict(), "run": run_info},
                               writer=writer, tokens_per_step=batch_size * seq_len,
                               flops_per_step=run_info["flops_per_token"] * batch_size * seq_len,
                               peak_flops=peak * jax.device_count())
        finally:
            writer.close()
        if config.train.num_samples > 0:
            write_samples(workdir, state.params, model_cfg, tok, config.train, config.seed)
    return state
