"""Pretraining: next-token prediction on packed documents, then a few samples."""

import functools
import os

import jax

from lm import flops, losses, sampling, trainer
from lm.data import pipeline
from lm.errors import ConfigError
from lm.evaluation import lm_eval_fn
from lm.model import ModelConfig, build_model


def validate(config) -> None:
    """The common checks, then the scaling section's."""
    trainer.validate(config)
    if config.scaling.flops not in flops.FLOPS_METHODS:
        raise ConfigError(
            f"config.scaling.flops={config.scaling.flops!r}: expected one of {flops.FLOPS_METHODS}"
        )
    if config.scaling.budget < 0:
        raise ConfigError(
            f"config.scaling.budget={config.scaling.budget} must be >= 0 (0: train.steps as set)"
        )


def resolved_steps(config, model_cfg: ModelConfig) -> dict:
    """{'train': {'steps': N}} when config.scaling.budget sets the steps, else {}."""
    if config.scaling.budget <= 0:
        return {}
    t = config.train
    steps = flops.steps_for_budget(
        model_cfg, t.seq_len, t.global_batch_size * t.seq_len, config.scaling.budget, config.scaling.flops
    )
    return {"train": {"steps": steps}}


def preview(config) -> dict:
    """What --print_config can resolve without preparing data: the steps of a FLOP budget, once the
    vocabulary size is known (config.model.vocab_size > 0)."""
    if config.model.vocab_size <= 0:
        return {}
    return resolved_steps(config, trainer.model_config(config, config.model.vocab_size))


def scaling_info(config, model_cfg: ModelConfig) -> dict:
    """The run's D (tokens trained) and C (training FLOPs, counted by `config.scaling.flops`)."""
    tokens = config.train.steps * config.train.global_batch_size * config.train.seq_len
    per_token = flops.flops_per_token(model_cfg, config.train.seq_len, config.scaling.flops)
    return {
        "flops_method": config.scaling.flops,
        "budget": config.scaling.budget,
        "flops_per_token": per_token,
        "tokens": tokens,
        "compute": per_token * tokens,
    }


def write_samples(workdir, params, model_cfg, tokenizer, train_cfg, seed) -> list[str]:
    """Generates `num_samples` continuations of the sample prompt, prints and saves them."""
    prompt = [tokenizer.bos_id] + tokenizer.encode(train_cfg.sample_prompt)
    outs = sampling.generate(
        {"params": params},
        model_cfg,
        [prompt] * train_cfg.num_samples,
        max_new_tokens=train_cfg.sample_tokens,
        rng=jax.random.PRNGKey(seed),
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    texts = [
        train_cfg.sample_prompt + tokenizer.decode([t for t in o if t != tokenizer.eos_id]) for o in outs
    ]
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "samples.txt"), "w") as f:
            for i, text in enumerate(texts):
                block = f"--- sample {i} ---\n{text}\n"
                print(block, end="")
                f.write(block)
    return texts


def run(user_config, workdir: str):
    """Trains (or resumes) a language model in `workdir`; returns the final train state."""
    s = trainer.setup(user_config)
    data = pipeline.prepare_data(user_config.data, user_config.tokenizer, user_config.train.seq_len)
    tok = data.tokenizer
    model_cfg = trainer.model_config(user_config, tok.vocab_size)
    trainer.check_model_layout(model_cfg, s.mesh)
    resolved = {"model": {"vocab_size": model_cfg.vocab_size}, **resolved_steps(user_config, model_cfg)}
    config = trainer.resolve(user_config, resolved)
    model = build_model(model_cfg)
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    tx, schedule = trainer.optimizer(config)
    run_info = {
        **trainer.throughput_info(config, model_cfg, s.mesh),
        "data": data.info,
        "scaling": scaling_info(config, model_cfg),
    }
    trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
    if jax.process_index() == 0:
        counts = run_info["param_counts"]
        print(
            f"model: {counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding); "
            f"data: {data.info.get('source')} {data.train.num_tokens:,} train tokens; "
            f"mesh {run_info['mesh']}; peak {run_info['peak_flops_per_device'] / 1e9:.0f} GFLOP/s/device "
            f"({run_info['peak_flops_source']})"
        )

    batch_fn = trainer.packed_batch_fn(data.train, batch_size, config.seed, s.batch_sharding)

    with s.scope():
        task = trainer.Task(
            init_params=trainer.zeros_init(model, (1, seq_len)),
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            loss_fn=functools.partial(losses.lm_loss, model=model, z_loss=config.train.z_loss),
            eval_fn=lm_eval_fn(
                model, data.eval, batch_size, config.train.eval_batches, tok.token_bytes(), s.batch_sharding
            ),
            tokens_per_step=batch_size * seq_len,
            flops_per_step=run_info["flops_per_token"] * batch_size * seq_len,
        )
        state = trainer.fit(s, task, config, workdir, run_info)
        if config.train.num_samples > 0:
            write_samples(workdir, state.params, model_cfg, tok, config.train, config.seed)
    return state
