"""Downstream fine-tuning: a classification, sentence-pair, token-tagging or span head on a
pretrained encoder (an mlm workdir) or causal LM (a pretrain or later workdir), or on the same
architecture from scratch (config.finetune.reinit).

The data is `lm.data.downstream`'s suite built from the corpus' held-out split with labels computed
by Python's own `tokenize` and `ast` (config.finetune.task: tagging | package | pair | span).
Every parameter trains. Logged at each eval (and before the first step): eval_loss and
eval_accuracy over the whole eval split (span: both ends right), and the trivial policy's
accuracy on the same split: eval_majority_accuracy (tagging, package, pair) or
eval_copy_first_span_accuracy (span). The best parameters by eval_accuracy are kept in best/.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lm import attention, checkpoint, losses, sharding, trainer
from lm.data import downstream, pipeline
from lm.data import mlm as mlm_data
from lm.data.tokenizer import load_tokenizer
from lm.errors import ConfigError
from lm.heads import DownstreamModel, MaskedLM


def validate(config) -> None:
    """The common checks, then config.finetune's and the data source (the stdlib corpus: its
    held-out split and file paths make the suite)."""
    trainer.validate(config)
    if config.finetune.task not in downstream.TASKS:
        raise ConfigError(
            f"config.finetune.task={config.finetune.task!r}: expected one of {downstream.TASKS}"
        )
    if config.data.source != "stdlib":
        raise ConfigError(
            f"config.data.source={config.data.source!r}: the downstream suite is built from 'stdlib'"
        )
    for key in ("num_train", "num_eval"):
        if config.data[key] < 0:
            raise ConfigError(f"config.data.{key}={config.data[key]} must be >= 0 (0: all)")


preview = trainer.preview_adopted  # what --print_config can resolve


def heldout_documents(data_cfg) -> list[tuple[str, str]]:
    """(path, text) of every document of the corpus' held-out split."""
    data_dir = pipeline.resolve_data_dir(data_cfg.data_dir)
    corpus = pipeline.open_corpus(data_cfg, data_dir)
    decode = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
    return [
        (decode(r["path"]), decode(r["text"]))
        for r in pipeline.read_records(corpus.builder, corpus.eval_split)
    ]


def head_loss(logits, batch, head: str):
    """Summed loss and correct count of a head's logits on a batch: `(loss_sum, correct, weight)`.

    Args:
      logits: 'classify' [batch, labels]; 'tag' [batch, seq, labels]; 'span' [batch, seq, 2].
      batch: 'labels' ([batch, 1] class, [batch, seq] tags with downstream.IGNORE, or [batch, 2]
        start and end columns), 'weights' [batch, 1] (0: a padding row), 'segment_ids' [batch, seq].
    Returns float32 scalars; weight counts rows (classify, span) or scored tokens (tag). A span's
    loss is the mean of its start and end cross-entropies over the row's real columns (BERT's).
    """
    labels, rows = batch["labels"], batch["weights"].astype(jnp.float32)
    if head == "classify":
        loss, _, weight = losses.cross_entropy(logits[:, None], labels, rows)
        correct = jnp.sum((jnp.argmax(logits, -1)[:, None] == labels) * rows)
        return loss, correct, weight
    if head == "tag":
        mask = (labels != downstream.IGNORE) * rows
        targets = jnp.maximum(labels, 0)
        loss, _, weight = losses.cross_entropy(logits, targets, mask)
        return loss, jnp.sum((jnp.argmax(logits, -1) == targets) * mask), weight
    real = batch["segment_ids"][:, :, None] > 0  # [batch, seq, 1]
    ends = jnp.where(real, logits, attention.MASK_VALUE).transpose(0, 2, 1)  # [batch, 2, seq]
    loss, _, weight = losses.cross_entropy(ends, labels, jnp.broadcast_to(rows, labels.shape))
    exact = jnp.all(jnp.argmax(ends, -1) == labels, axis=-1, keepdims=True)  # [batch, 1]
    return loss / 2, jnp.sum(exact * rows), weight / 2


def finetune_loss(params, batch, rng, *, model):
    """The core's loss_fn: `(loss_sum, {'weight', 'accuracy'})`."""
    logits = model.apply(
        {"params": params},
        batch["tokens"],
        segment_ids=batch["segment_ids"],
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    loss, correct, weight = head_loss(logits, batch, model.head)
    return loss, {"weight": weight, "accuracy": correct}


def baseline_accuracy(suite: downstream.Suite, task: str) -> dict:
    """The trivial policy's accuracy on the eval split, as its eval metric."""
    labels = suite.eval.labels
    if task == "span":
        return {
            "eval_copy_first_span_accuracy": float(np.mean(np.all(suite.baseline_spans == labels, axis=1)))
        }
    scored = labels[labels != downstream.IGNORE]
    return {"eval_majority_accuracy": float(np.mean(scored == suite.majority))}


def split_batches(split: downstream.Split, batch_size: int, batch_sharding) -> list[dict]:
    """The whole split in order as global batches; the last one filled with weight-0 rows."""
    mine = sharding.process_slice(batch_size)
    out = []
    for b in range(math.ceil(split.num_rows / batch_size)):
        ids = b * batch_size + np.arange(mine.start, mine.stop)
        real = ids < split.num_rows
        batch = split.take(np.where(real, ids, 0))
        batch["weights"] = real[:, None].astype(np.float32)
        out.append(sharding.global_batch(batch, batch_sharding))
    return out


def eval_fn(model, batches, baseline: dict):
    """`params -> {eval_loss, eval_accuracy, the baseline's}` over fixed batches."""
    sums = jax.jit(
        lambda p, b: jnp.stack(
            head_loss(model.apply({"params": p}, b["tokens"], segment_ids=b["segment_ids"]), b, model.head)
        )
    )

    def evaluate(params):
        loss, correct, weight = np.sum([np.asarray(sums(params, b)) for b in batches], axis=0)
        return {"eval_loss": float(loss / weight), "eval_accuracy": float(correct / weight), **baseline}

    return evaluate


def pretrained_lm(config, saved: dict, model_cfg, s, tok_sep: int):
    """The 'lm' parameters of the init_from run, restored sharded like `s`'s (an mlm run's
    encoder, or a causal LM's whole model)."""
    if saved.get("task") == "mlm":
        nsp = saved["mlm"]["nsp"]
        seq_len = saved["train"]["seq_len"]
        saved_model = MaskedLM(model_cfg, mlm_data.NSP_CLASSES[nsp] if nsp != "none" else 0, tok_sep)
        init = trainer.zeros_init(saved_model, (1, seq_len), (1, mlm_data.max_predictions(seq_len)))
        return checkpoint.restore_params(config.init_from, trainer.abstract_params(init, s))["lm"]
    from lm.model import Transformer

    init = trainer.zeros_init(Transformer(model_cfg), (1, 8))
    return checkpoint.restore_params(config.init_from, trainer.abstract_params(init, s))


def run(user_config, workdir: str):
    """Fine-tunes (or resumes) in `workdir`; returns the final train state."""
    run_dir, saved = checkpoint.pretrained_run(user_config.init_from)
    resolved = trainer.adopted(saved, user_config)
    config = trainer.resolve(user_config, resolved)
    if config.train.seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.train.seq_len={config.train.seq_len} exceeds the pretrained model's "
            f"max_seq_len={config.model.max_seq_len} ({run_dir})"
        )
    tok = load_tokenizer(f"{run_dir}/tokenizer")
    s = trainer.setup(config)
    task, seq_len, batch_size = config.finetune.task, config.train.seq_len, config.train.global_batch_size
    suite = downstream.build_suite(
        task,
        heldout_documents(config.data),
        tok,
        seq_len,
        config.data.eval_fraction,
        config.data.num_train,
        config.data.num_eval,
    )
    model_cfg = trainer.model_config(config, tok.vocab_size)
    trainer.check_model_layout(model_cfg, s.mesh)
    model = DownstreamModel(model_cfg, downstream.HEAD[task], max(len(suite.label_names), 2), tok.eos_id)
    tx, schedule = trainer.optimizer(config)
    run_info = trainer.throughput_info(config, model_cfg, s.mesh)
    run_info.update(
        init_from=run_dir,
        data={
            "task": task,
            "labels": list(suite.label_names),
            "train_examples": suite.train.num_rows,
            "eval_examples": suite.eval.num_rows,
        },
    )
    trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
    if jax.process_index() == 0:
        print(
            f"{task} from {run_dir} ({saved.get('task')}{', reinitialised' if config.finetune.reinit else ''}"
            "): "
            f"{suite.train.num_rows} train and {suite.eval.num_rows} eval examples, "
            f"{len(suite.label_names) or 'start/end'} labels; {run_info['params']:,} parameters"
        )

    def batch_fn(step):
        ids = pipeline.global_row_ids(
            suite.train.num_rows, step, batch_size, config.seed, jax.process_index(), jax.process_count()
        )
        batch = suite.train.take(ids)
        batch["weights"] = np.ones((len(ids), 1), np.float32)
        return sharding.global_batch(batch, s.batch_sharding)

    with s.scope():
        start_params = None
        if not config.finetune.reinit:
            lm_params = functools.cache(lambda: pretrained_lm(config, saved, model_cfg, s, tok.eos_id))
            start_params = lambda params: {**params, "lm": lm_params()}  # noqa: E731
        task_ = trainer.Task(
            init_params=trainer.zeros_init(model, (1, seq_len)),
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            start_params=start_params,
            loss_fn=functools.partial(finetune_loss, model=model),
            eval_fn=eval_fn(
                model, split_batches(suite.eval, batch_size, s.batch_sharding), baseline_accuracy(suite, task)
            ),
            eval_at_start=True,
            best=("eval_accuracy", "max"),
            tokens_per_step=batch_size * seq_len,
            flops_per_step=run_info["flops_per_token"] * batch_size * seq_len,
        )
        return trainer.fit(s, task_, config, workdir, run_info)
