"""Supervised fine-tuning: a pretrained model learns (prompt, response) pairs, loss on the response.

init_from (a pretraining workdir or a checkpoint inside one) gives the architecture, the tokenizer
and the starting parameters. Training uses the next-token loss on packed examples whose loss mask
covers only response tokens and the closing EOS; with config.lora.rank > 0 only LoRA adapters train
on a frozen base (NF4 with lora.quantize: QLoRA), with config.prefix.length or
config.prompt_tuning.length > 0 only key/value prefixes or a soft prompt (`lm.prompt_tuning`).
Each eval (and once before the first step)
reports the held-out loss and, for data with a grader, the graded score of greedy answers to
held-out prompts; the parameters with the best score are kept in workdir/best/.
"""

import functools
import os

import flax.linen as nn
import jax

from lm import checkpoint, lora, losses, prompt_tuning, sharding, trainer
from lm.data import graded_tasks
from lm.data import sft as sft_data
from lm.data.tokenizer import load_tokenizer
from lm.errors import ConfigError
from lm.evaluation import grader_eval_fn, lm_eval_fn
from lm.model import Transformer


def validate(config) -> None:
    """The common checks (LoRA's included), prefix and prompt tuning's, then the graded evaluation's."""
    trainer.validate(config)
    prompt_tuning.from_config(config)
    for key in ("eval_prompts", "max_new_tokens"):
        if config.sft[key] < 0:
            raise ConfigError(f"config.sft.{key}={config.sft[key]} must be >= 0")


preview = trainer.preview_adopted  # what --print_config can resolve


def sft_loss(params, batch, rng, frozen=None, *, model, lora_cfg, z_loss: float, peft=None):
    """The response-only LM loss of full fine-tuning (`frozen` None), of LoRA adapters `params` on
    the frozen base `frozen`, or (`peft` on) of a prompt or prefixes `params` beside it:
    `(loss_sum, {"weight", "z_loss"})` over `[batch, seq]` arrays."""
    if frozen is None:
        return losses.lm_loss(params, batch, rng, model=model, z_loss=z_loss)
    if peft is not None and peft.on:
        merged = prompt_tuning.plain(frozen, params, model.config)
        return losses.lm_loss(merged, batch, rng, model=model, z_loss=z_loss)
    logits = lora.apply(
        model,
        frozen,
        params,
        lora_cfg,
        batch["inputs"],
        rng=rng,
        deterministic=rng is None,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    return losses.next_token_loss(logits, batch, z_loss)


def frozen_base(config, abstract, init_params, mesh, rules):
    """The frozen base of a LoRA run, sharded: pretrained (or random with sft.reinit), its Linear
    kernels stored in NF4 when config.lora.quantize == 'nf4' (QLoRA)."""
    shardings = sharding.tree_shardings(abstract, mesh, rules)
    if config.sft.reinit:
        base = jax.jit(lambda r: nn.meta.unbox(init_params(r)), out_shardings=shardings)(
            jax.random.PRNGKey(config.seed)
        )
    else:
        base = checkpoint.restore_params(
            config.init_from, checkpoint.abstract_like(sharding.unboxed(abstract), shardings)
        )
    return lora.stored_base(base, config.lora)


def run(user_config, workdir: str):
    """Fine-tunes (or resumes) in `workdir`; returns the final train state."""
    run_dir, saved = checkpoint.pretrained_run(user_config.init_from)
    resolved = trainer.adopted(saved, user_config)
    peft = prompt_tuning.from_config(user_config)
    if peft.on:  # the model carries its prompt or prefixes; the frozen base does not
        resolved["model"].update(peft.model_fields())
    config = trainer.resolve(user_config, resolved)
    if config.train.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.train.seq_len={config.train.seq_len} exceeds the pretrained model's "
            f"max_seq_len={config.model.max_seq_len} ({run_dir})"
        )
    prompt_tuning.check_positions(config.model, config.train.seq_len, peft)
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    s = trainer.setup(config)
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    data = sft_data.prepare_sft_data(config.data, config.template, tok, seq_len)
    model_cfg = trainer.model_config(config, tok.vocab_size)
    trainer.check_model_layout(model_cfg, s.mesh)
    model = Transformer(model_cfg)
    lora_cfg = lora.from_config(config.lora)
    peak_lr = config.lora.lr if lora_cfg.rank and config.lora.lr else prompt_tuning.learning_rate(config)
    tx, schedule = trainer.optimizer(config, peak_lr)
    throughput = trainer.throughput_info(config, model_cfg, s.mesh)
    base_cfg = model_cfg.replace(prefix_length=0, prompt_length=0)
    init_params = trainer.zeros_init(Transformer(base_cfg), (1, seq_len))

    with s.scope():
        frozen, start_params = None, None
        if peft.on:
            abstract = jax.eval_shape(init_params, jax.random.PRNGKey(config.seed))
            frozen = frozen_base(config, abstract, init_params, s.mesh, s.rules)
            trained_init = lambda r: prompt_tuning.init_trainable(r, model_cfg, peft)
            text = data.train.rows([0])["inputs"][0]  # the first training row's tokens

            def start_params(params):
                started = prompt_tuning.start_from_text(params, frozen, model_cfg, text)
                return jax.device_put(started, jax.tree.map(lambda x: x.sharding, params))

        elif lora_cfg.rank:
            abstract = jax.eval_shape(init_params, jax.random.PRNGKey(config.seed))
            frozen = frozen_base(config, abstract, init_params, s.mesh, s.rules)
            trained_init = lambda r: lora.init_adapters(r, abstract, lora_cfg)
            start_params = lambda adapters: lora.copy_saved_modules(adapters, frozen, lora_cfg)
        else:
            trained_init = init_params
            if not config.sft.reinit:
                start_params = lambda params: trainer.restore_like(config.init_from, params)
        if peft.on:
            plain = jax.jit(lambda p, f: prompt_tuning.plain(f, p, model_cfg))
        else:
            plain = jax.jit(lambda p, f: p if f is None else lora.merge(f, p, lora_cfg))
        trained_shapes = jax.eval_shape(trained_init, jax.random.PRNGKey(0))
        trainable = prompt_tuning.count(trained_shapes)
        run_info = {**throughput, "init_from": run_dir, "trainable_params": trainable, "data": data.info}
        if peft.on:  # the model's own prompt or prefixes (not a reparameterisation MLP) are parameters too
            run_info["params"] += prompt_tuning.count(
                jax.eval_shape(
                    lambda t: prompt_tuning.plain({}, t, model_cfg), sharding.unboxed(trained_shapes)
                )
            )
        if lora_cfg.rank or peft.on:  # frozen weights get no weight gradients: 4N of the 6N per token
            run_info["flops_per_token"] *= 2 / 3
        trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
        if jax.process_index() == 0:
            how = (
                f"LoRA rank {lora_cfg.rank}, {config.lora.quantize or 'float'} base"
                if lora_cfg.rank
                else f"prefix {peft.prefix_length}, prompt {peft.prompt_length}, frozen base"
                if peft.on
                else "full"
            )
            print(
                f"SFT from {run_dir}: {run_info['params']:,} parameters, {trainable:,} trained "
                f"({how}); {data.info.get('source')} data; mesh {run_info['mesh']}"
            )

        batch_fn = trainer.packed_batch_fn(data.train, batch_size, config.seed, s.batch_sharding)

        eval_loss = lm_eval_fn(
            model, data.eval, batch_size, config.train.eval_batches, tok.token_bytes(), s.batch_sharding
        )
        graded = [ex for ex in data.eval_examples if ex.get("task") in graded_tasks.TASKS][
            : config.sft.eval_prompts
        ]
        grade = graded and grader_eval_fn(model_cfg, tok, config.template, graded, config.sft.max_new_tokens)

        def evaluate(params):
            params = plain(params, frozen)
            return {**eval_loss(params), **(grade(params) if grade else {})}

        task = trainer.Task(
            init_params=trained_init,
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            start_params=start_params,
            loss_fn=functools.partial(
                sft_loss, model=model, lora_cfg=lora_cfg, z_loss=config.train.z_loss, peft=peft
            ),
            frozen=frozen,
            eval_fn=evaluate,
            eval_at_start=True,
            to_plain=lambda p: plain(p, frozen),
            best=("eval_grader_score", "max") if grade else ("eval_loss", "min"),
            tokens_per_step=batch_size * seq_len,
            flops_per_step=run_info["flops_per_token"] * batch_size * seq_len,
        )
        return trainer.fit(s, task, config, workdir, run_info)
