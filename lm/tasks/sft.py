"""Supervised fine-tuning: a pretrained model learns (prompt, response) pairs, loss on the response.

init_from (a pretraining workdir or a checkpoint inside one) gives the architecture, the tokenizer
and the starting parameters. Training reuses the pretraining loss on packed examples whose loss
mask covers only response tokens and the closing EOS. Each eval (and once before the first step)
reports the held-out loss and, for data with a grader, the graded score of greedy answers to
held-out prompts; the parameters with the best score are kept in workdir/best/.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm import checkpoint, lora, sampling, sharding
from lm import metrics as metrics_lib
from lm.data import graded_tasks, pipeline
from lm.data import sft as sft_data
from lm.data.tokenizer import load_tokenizer
from lm.errors import ConfigError
from lm.loop import train_with_evals
from lm.model import Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.tasks import pretrain
from lm.train_state import init_state, jit_train_step

# Model keys that must match the pretrained parameters; the rest (dropout, remat, the attention
# implementation) are the SFT run's.
RUN_ONLY_MODEL_KEYS = ("dropout", "remat", "attention")
EVAL_BATCH = 128  # prompts per sampler call of the grader eval


def adopt_architecture(config, saved: dict) -> None:
    """Copies the pretrained run's architecture (config.model minus RUN_ONLY_MODEL_KEYS) into `config`."""
    for key, value in saved["model"].items():
        if key not in RUN_ONLY_MODEL_KEYS and key in config.model:
            config.model[key] = tuple(value) if isinstance(value, list) else value


def grader_eval_fn(model_cfg, tokenizer, template_cfg, examples: list[dict], max_new_tokens: int):
    """`params -> {eval_grader_score, eval_exact_match, eval_score_<task>, eval_exact_<task>}`.

    Greedy answers (temperature 0, stop at EOS) to the held-out prompts of `examples`, graded by
    each task's programmatic grader; the prompts go through the sampler in batches of similar length.
    """
    prompts = [sft_data.encode_prompt(tokenizer, template_cfg, ex["prompt"]) for ex in examples]

    def evaluate(params):
        outs = sampling.generate_sorted({"params": params}, model_cfg, prompts, max_batch=EVAL_BATCH,
                                        max_new_tokens=max_new_tokens, rng=jax.random.PRNGKey(0),
                                        temperature=0.0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        answers = [tokenizer.decode([t for t in out if t != tokenizer.eos_id]) for out in outs]
        grades = graded_tasks.grade_batch(examples, answers)
        record = {"eval_grader_score": grades.pop("score"), "eval_exact_match": grades.pop("exact")}
        record.update({f"eval_{k}": v for k, v in grades.items()})
        return record
    return evaluate


def best_keeper(workdir: str, key: str, mode: str = "max", to_plain=lambda params: params):
    """`(step, state, record) -> None` saving `to_plain(state.params)` (plain model parameters, LoRA
    merged) to workdir/best/ whenever `record[key]` beats the best so far (`mode` 'max' or 'min';
    the best survives restarts in best/<step>/meta)."""
    mngr = checkpoint.manager(workdir, keep=1, subdir="best")
    step = mngr.latest_step()
    best = {"score": None if step is None else checkpoint.restore_meta(mngr, step).get(key)}
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)

    def keep(step, state, record):
        if key in record and (best["score"] is None or better(record[key], best["score"])):
            best["score"] = record[key]
            checkpoint.save(mngr, step, {"params": to_plain(state.params)}, {key: record[key], "step": step})
    return keep


def frozen_base(config, abstract, init_params, mesh, rules, lora_cfg):
    """The frozen base of a LoRA run, sharded: pretrained (or random with sft.reinit), its Linear
    kernels stored in NF4 when config.lora.quantize == 'nf4' (QLoRA)."""
    shardings = sharding.tree_shardings(abstract, mesh, rules)
    if config.sft.reinit:
        base = jax.jit(lambda r: nn.meta.unbox(init_params(r)), out_shardings=shardings)(
            jax.random.PRNGKey(config.seed))
    else:
        base = checkpoint.restore_params(config.init_from,
                                           checkpoint.abstract_like(sharding.unboxed(abstract), shardings))
    return lora.stored_base(base, config.lora)


def sft_loss(params, batch, rng, frozen=None, *, model, lora_cfg, z_loss: float):
    """The response-only LM loss of full fine-tuning (`frozen` None) or of LoRA adapters `params`
    on the frozen base `frozen`: `(loss_sum, {"weight", "z_loss"})` over `[batch, seq]` arrays."""
    if frozen is None:
        return pretrain.lm_loss(params, batch, rng, model=model, z_loss=z_loss)
    logits = lora.apply(model, frozen, params, lora_cfg, batch["inputs"], rng=rng, deterministic=rng is None,
                        positions=batch["positions"], segment_ids=batch["segment_ids"])
    return pretrain.loss_from_logits(logits, batch, z_loss)


def run(config, workdir: str):
    """Fine-tunes (or resumes) in `workdir`; returns the final train state."""
    if not config.init_from:
        raise ConfigError("config.init_from: SFT starts from a pretraining workdir or a checkpoint in one")
    run_dir, saved = checkpoint.pretrained_run(config.init_from)
    adopt_architecture(config, saved)
    if config.train.seq_len > config.model.max_seq_len:
        raise ConfigError(f"config.train.seq_len={config.train.seq_len} exceeds the pretrained model's "
                          f"max_seq_len={config.model.max_seq_len} ({run_dir})")
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    pretrain.check_batch_layout(config.train, mesh)
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    data = sft_data.prepare_sft_data(config.data, config.template, tok, seq_len)
    model_cfg = pretrain.model_config(config, tok.vocab_size)
    pretrain.check_model_layout(model_cfg, mesh)
    model = Transformer(model_cfg)
    lora_cfg = lora.from_config(config.lora)
    peak_lr = config.lora.lr if lora_cfg.rank and config.lora.lr else config.optimizer.lr
    schedule = learning_rate_schedule(config.schedule, peak_lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    throughput = pretrain.throughput_info(config, model_cfg, mesh)  # measures the peak: outside the mesh

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init_params = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
        frozen = None
        if lora_cfg.rank == 0:
            state, state_shardings = init_state(init_params, tx, config.seed, mesh, rules)
        else:
            abstract = jax.eval_shape(init_params, jax.random.PRNGKey(config.seed))
            frozen = frozen_base(config, abstract, init_params, mesh, rules, lora_cfg)
            state, state_shardings = init_state(lambda r: lora.init_adapters(r, abstract, lora_cfg), tx,
                                                  config.seed, mesh, rules)
        frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
        plain_params = jax.jit(lambda p, f: p if f is None else lora.merge(f, p, lora_cfg))

        run_info = {**throughput, "init_from": run_dir,
                    "trainable_params": sum(x.size for x in jax.tree.leaves(state.params)), "data": data.info}
        if lora_cfg.rank:  # frozen weights get no weight gradients: 4N of the 6N per token
            run_info["flops_per_token"] *= 2 / 3
        if jax.process_index() == 0:
            tok.save(os.path.join(workdir, "tokenizer"))
            metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"), {**config.to_dict(), "run": run_info})
            how = f"LoRA rank {lora_cfg.rank}, {config.lora.quantize or 'float'} base" if lora_cfg.rank else "full"
            print(f"SFT from {run_dir}: {run_info['params']['total']:,} parameters, "
                  f"{run_info['trainable_params']:,} trained ({how}); {data.info.get('source')} data; "
                  f"mesh {run_info['mesh']}")
        mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
        step, restored = checkpoint.restore(mngr, checkpoint.abstract_like(state, state_shardings))
        if restored is not None:
            state = restored
            print(f"resumed from step {step}")
        elif lora_cfg.rank:
            state = state.replace(params=lora.copy_saved_modules(state.params, frozen, lora_cfg))
        elif not config.sft.reinit:
            params = checkpoint.restore_params(
                config.init_from, checkpoint.abstract_like(state.params, state_shardings.params))
            opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
            state = state.replace(params=params, opt_state=opt_state)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        loss_fn = functools.partial(sft_loss, model=model, lora_cfg=lora_cfg, z_loss=config.train.z_loss)
        step_fn = jit_train_step(loss_fn, tx, schedule, config.train.grad_accum, state_shardings,
                                   batch_sharding, mesh, frozen_shardings)

        def batch_fn(step):
            rows = pipeline.batch_at_step(data.train, step, batch_size, config.seed, jax.process_index(),
                                            jax.process_count())
            return sharding.global_batch(rows, batch_sharding)

        extra = () if frozen is None else (frozen,)
        compiled = step_fn.lower(state, batch_fn(int(state.step)), *extra).compile()
        eval_step = jax.jit(functools.partial(pretrain.eval_sums, model=model))
        eval_loss = pretrain.make_eval_fn(eval_step, data.eval, batch_size, config.train.eval_batches,
                                            tok.token_bytes(), batch_sharding)
        graded = [ex for ex in data.eval_examples if ex.get("task") in graded_tasks.TASKS]
        grade = None
        if graded:
            grade = grader_eval_fn(model_cfg, tok, config.template, graded[:config.sft.eval_prompts],
                                     config.sft.max_new_tokens)

        def evaluate(params):
            params = plain_params(params, frozen)
            return {**eval_loss(params), **(grade(params) if grade else {})}

        keep_best = best_keeper(workdir, *(("eval_grader_score", "max") if grade else ("eval_loss", "min")),
                                  to_plain=lambda p: plain_params(p, frozen))
        state = train_with_evals(state, workdir=workdir, eval_fn=evaluate, after_eval=keep_best,
                                 step_fn=lambda s, b: compiled(s, b, *extra), batch_fn=batch_fn,
                                 train_cfg=config.train, ckpt_mngr=mngr,
                                 meta={"config": config.to_dict(), "run": run_info},
                                 tokens_per_step=batch_size * seq_len,
                                 flops_per_step=run_info["flops_per_token"] * batch_size * seq_len,
                                 peak_flops=run_info["peak_flops_per_device"] * jax.device_count())
    return state

