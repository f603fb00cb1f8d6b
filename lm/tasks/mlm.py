"""Masked-LM pretraining (BERT): a bidirectional Transformer learns to restore masked tokens and,
with config.mlm.nsp, whether segment B follows segment A (`lm.data.mlm` builds the rows).

The loss of a row is the mean cross-entropy over its batch's picked positions plus its NSP
cross-entropy. Logged at each eval: eval_mlm_loss, eval_mlm_accuracy (over the picked positions of
fixed held-out rows) and, with NSP, eval_nsp_loss and eval_nsp_accuracy. The model's vocabulary
is the tokenizer's plus [MASK]; `configs/finetune/` runs start from the workdir.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lm import losses, sharding, trainer
from lm.data import mlm as mlm_data
from lm.errors import ConfigError
from lm.heads import MaskedLM


def validate(config) -> None:
    """The common checks, then config.mlm's and the tied embeddings the masked-LM head reads."""
    trainer.validate(config)
    if config.mlm.nsp not in mlm_data.NSP_KINDS:
        raise ConfigError(f"config.mlm.nsp={config.mlm.nsp!r}: expected one of {mlm_data.NSP_KINDS}")
    if not config.model.tie_embeddings:
        raise ConfigError("config.model.tie_embeddings=False: the masked-LM head reads the token embeddings")
    if config.train.seq_len < 8:
        raise ConfigError(f"config.train.seq_len={config.train.seq_len} leaves no room for two segments")


def sums(params, batch, rng, *, model):
    """Summed masked-LM and NSP figures of one batch (dict of `lm.data.mlm.mlm_row` arrays
    stacked, nsp_labels [batch, 1]): {'mlm_loss', 'mlm_correct', 'mlm_count', 'nsp_loss',
    'nsp_correct', 'rows'} float32 scalars; `rng` None: no dropout."""
    mlm_logits, nsp_logits = model.apply(
        {"params": params},
        batch["inputs"],
        batch["mlm_positions"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    weights = batch["mlm_weights"]
    mlm_loss, _, count = losses.cross_entropy(mlm_logits, batch["mlm_targets"], weights)
    correct = jnp.sum((jnp.argmax(mlm_logits, -1) == batch["mlm_targets"]) * weights)
    out = {"mlm_loss": mlm_loss, "mlm_correct": correct, "mlm_count": count}
    rows = jnp.asarray(batch["inputs"].shape[0], jnp.float32)
    labels = batch["nsp_labels"]  # [batch, 1]
    if nsp_logits is None:
        out.update(nsp_loss=jnp.zeros(()), nsp_correct=jnp.zeros(()))
    else:
        out["nsp_loss"] = losses.cross_entropy(nsp_logits[:, None], labels, jnp.ones(labels.shape))[0]
        out["nsp_correct"] = jnp.sum(jnp.argmax(nsp_logits, -1) == labels[:, 0]).astype(jnp.float32)
    return {**out, "rows": rows}


def mlm_loss(params, batch, rng, *, model):
    """The training objective as the core's loss_fn: `(loss_sum, aux)` with weight = rows, so the
    logged loss is the mean masked-LM cross-entropy plus the mean NSP cross-entropy."""
    s = sums(params, batch, rng, model=model)
    count = jnp.maximum(s["mlm_count"], 1.0)
    mlm = s["rows"] * s["mlm_loss"] / count
    aux = {
        "weight": s["rows"],
        "mlm_loss": mlm,
        "mlm_accuracy": s["rows"] * s["mlm_correct"] / count,
        "nsp_loss": s["nsp_loss"],
        "nsp_accuracy": s["nsp_correct"],
    }
    return mlm + s["nsp_loss"], aux


def eval_fn(model, batches, with_nsp: bool):
    """`params -> {eval_mlm_loss, eval_mlm_accuracy[, eval_nsp_loss, eval_nsp_accuracy]}` over
    fixed held-out batches."""
    step = jax.jit(functools.partial(sums, rng=None, model=model))

    def evaluate(params):
        total = {}
        for batch in batches:
            for k, v in step(params, batch).items():
                total[k] = total.get(k, 0.0) + float(v)
        record = {
            "eval_mlm_loss": total["mlm_loss"] / total["mlm_count"],
            "eval_mlm_accuracy": total["mlm_correct"] / total["mlm_count"],
        }
        if with_nsp:
            record.update(
                eval_nsp_loss=total["nsp_loss"] / total["rows"],
                eval_nsp_accuracy=total["nsp_correct"] / total["rows"],
            )
        return record

    return evaluate


def run(user_config, workdir: str):
    """Pretrains (or resumes) a masked-LM encoder in `workdir`; returns the final train state."""
    s = trainer.setup(user_config)
    tok, train, heldout, info = mlm_data.prepare_lines(user_config.data, user_config.tokenizer)
    special = mlm_data.special_ids(tok)
    model_cfg = trainer.model_config(user_config, special.vocab_size)
    trainer.check_model_layout(model_cfg, s.mesh)
    resolved = {"model": {"vocab_size": model_cfg.vocab_size}}
    config = trainer.resolve(user_config, resolved)
    nsp = config.mlm.nsp
    model = MaskedLM(model_cfg, mlm_data.NSP_CLASSES[nsp] if nsp != "none" else 0, special.sep)
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    tx, schedule = trainer.optimizer(config)
    run_info = {
        **trainer.throughput_info(config, model_cfg, s.mesh),
        "data": info,
        "special_ids": dataclasses.asdict(special),
    }
    # The masked-LM head projects the picked positions only.
    picks = mlm_data.max_predictions(seq_len)
    run_info["flops_per_token"] -= 6 * model_cfg.vocab_size * model_cfg.d_model * (1 - picks / seq_len)
    trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
    if jax.process_index() == 0:
        print(
            f"masked LM ({nsp} NSP): {run_info['params']:,} parameters; {info['train_docs']:,} train "
            f"documents of {info['train_lines']:,} lines; mesh {run_info['mesh']}"
        )

    def batch_fn(step):
        local = mlm_data.train_batch(train, step, batch_size, config.seed, nsp, seq_len, special)
        return sharding.global_batch(local, s.batch_sharding)

    eval_batches = [  # train.eval_batches fixed held-out batches (0: one)
        sharding.global_batch(
            mlm_data.eval_batch(heldout, i, batch_size, config.seed, nsp, seq_len, special), s.batch_sharding
        )
        for i in range(max(config.train.eval_batches, 1))
    ]
    with s.scope():
        task = trainer.Task(
            init_params=trainer.zeros_init(model, (1, seq_len), (1, picks)),
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            loss_fn=functools.partial(mlm_loss, model=model),
            eval_fn=eval_fn(model, eval_batches, nsp != "none"),
            tokens_per_step=batch_size * seq_len,
            flops_per_step=run_info["flops_per_token"] * batch_size * seq_len,
        )
        return trainer.fit(s, task, config, workdir, run_info)
