"""DPO (Rafailov et al. 2023) on the reward model's comparisons: the policy is its own reward model.

The implicit reward of a response is r = beta * (log pi(y|x) - log pi_ref(y|x)) with pi_ref the
frozen SFT policy. For K ranked responses per prompt the loss is `losses.ranking_loss` on these
r, exactly the reward model's loss (for K = 2 it is DPO's -log sigmoid(r_w - r_l)). Log-probs are
summed over the whole sequence after BOS: the prompt's terms are the same for every response of a
prompt under a given model, so they cancel in every pair difference, from the loss and from its
gradient. The reference log-probs are computed once, before training.

Data: `dpo.comparisons_from` names a reward-model workdir whose comparisons.npz (the SFT policy's
samples ranked by the oracle, or HH pairs) DPO reuses, so DPO and the reward model learn from the
same preferences. Or, with config.data.source 'trl' (or 'hh') and no comparisons_from, DPO reads
the {"prompt", "chosen", "rejected"} pairs of config.data.files itself
(`preferences.pair_comparisons`: the pairs a reward model builds from the same files,
eval_fraction and seq_len). Evaluated on the selection half of the held-out comparisons (loss and
accuracy) and, where the comparisons come from graded tasks, by the graded score of greedy answers
to held-out dev prompts (config.dpo.eval_prompts), which only measures: best/ keeps the policy
with the best held-out comparison accuracy (eval_accuracy), never chosen by the grader.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint, losses, rl, saved_model, trainer
from lm.data import comparison_batches as batches_lib
from lm.data import preferences
from lm.data.tokenizer import load_tokenizer
from lm.errors import ConfigError
from lm.evaluation import grader_eval_fn
from lm.model import Transformer

FILE_SOURCES = ("trl", "hh")  # config.data.source values DPO reads pairs of itself


def validate(config) -> None:
    """The common checks, then DPO's own."""
    trainer.validate(config)
    from_files = config.data.source in FILE_SOURCES
    if from_files and config.dpo.comparisons_from:
        raise ConfigError(
            f"config.dpo.comparisons_from={config.dpo.comparisons_from!r} and config.data.source="
            f"{config.data.source!r} both name DPO's pairs; set one"
        )
    if not from_files and not config.dpo.comparisons_from:
        raise ConfigError(
            "config.dpo.comparisons_from: DPO reuses a reward-model workdir's comparisons, or reads "
            "config.data.files with config.data.source='trl'"
        )
    if config.dpo.beta <= 0:
        raise ConfigError(f"config.dpo.beta={config.dpo.beta} must be positive")
    for key in ("eval_prompts", "max_new_tokens"):
        if config.dpo[key] < 0:
            raise ConfigError(f"config.dpo.{key}={config.dpo[key]} must be >= 0")


preview = trainer.preview_adopted  # what --print_config can resolve


def sequence_logprobs(model, params, tokens, last_index):
    """Sum of log pi(token) over columns 1..last_index of right-padded sequences.

    Args:
      tokens: [b, seq] int32; last_index: [b] int32 column of each row's last token (its EOS).
    Returns:
      [b] float32.
    """
    column = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    in_sequence = (column <= last_index[:, None]).astype(jnp.int32)
    logits = model.apply({"params": params}, tokens, segment_ids=in_sequence)
    return jnp.sum(rl.sequence_logprobs(logits, tokens, in_sequence), axis=1)


def dpo_loss(params, batch, rng, *, model, beta: float):
    """`(loss_sum, {"weight", "accuracy"})` of `losses.ranking_loss` on implicit rewards.

    batch: tokens [b, K, seq], last_index, ranks, ref_logp [b, K], mask [b, K].
    """
    b, k, length = batch["tokens"].shape
    logp = sequence_logprobs(
        model, params, batch["tokens"].reshape(b * k, length), batch["last_index"].reshape(b * k)
    ).reshape(b, k)
    implicit = beta * (logp - batch["ref_logp"])
    loss_sum, accuracy_sum, weight = losses.ranking_loss(implicit, batch["ranks"], batch["mask"])
    return loss_sum, {"weight": weight, "accuracy": accuracy_sum}


def reference_logprobs(model, params, comparisons: preferences.Comparisons, rows: int) -> np.ndarray:
    """[n, K] sequence log-probs of every response under the frozen reference, `rows` sequences a
    call (`preferences.in_length_order`)."""
    n, k, length = comparisons.tokens.shape
    tokens = comparisons.tokens.reshape(n * k, length)
    last = comparisons.last_index.reshape(n * k)
    step = jax.jit(functools.partial(sequence_logprobs, model, params))
    call = lambda ids, width: step(jnp.asarray(tokens[ids, :width]), jnp.asarray(last[ids]))
    return preferences.in_length_order(call, last + 1, rows, length).reshape(n, k).astype(np.float32)


def saved_comparisons(comparisons_from: str) -> preferences.PreferenceData:
    """The comparisons.npz of the reward-model workdir `comparisons_from`; ConfigError without one."""
    data = preferences.load(os.path.join(comparisons_from, saved_model.COMPARISONS_FILE))
    if data is None:
        raise ConfigError(
            f"config.dpo.comparisons_from={comparisons_from!r}: no "
            f"{saved_model.COMPARISONS_FILE} there (not a reward-model workdir?)"
        )
    return data


def file_comparisons(config, tok, max_seq_len: int) -> preferences.PreferenceData:
    """The K = 2 comparisons of config.data's preference files (`preferences.pair_comparisons`),
    tokenized by `tok` in config.template (the SFT run's) at config.train.seq_len."""
    seq_len = config.train.seq_len
    if seq_len > max_seq_len:
        raise ConfigError(f"config.train.seq_len={seq_len} exceeds the SFT model's max_seq_len={max_seq_len}")
    return preferences.pair_comparisons(config.data, config.template, tok, seq_len, (0, 0))


def run(user_config, workdir: str):
    """DPO from the SFT workdir `init_from` on the comparisons of `dpo.comparisons_from`, or of
    config.data.files (source 'trl' or 'hh')."""
    from_files = user_config.data.source in FILE_SOURCES
    data = None if from_files else saved_comparisons(user_config.dpo.comparisons_from)
    run_dir, saved = checkpoint.pretrained_run(user_config.init_from)
    resolved = trainer.adopted(saved, user_config)
    config = trainer.resolve(user_config, resolved)
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    if from_files:
        data = file_comparisons(config, tok, config.model.max_seq_len)
    s = trainer.setup(config)
    model_cfg = trainer.model_config(config, tok.vocab_size)
    trainer.check_model_layout(model_cfg, s.mesh)
    model = Transformer(model_cfg)
    batch_size, k = config.train.global_batch_size, data.train.tokens.shape[1]
    tx, schedule = trainer.optimizer(config)
    run_info = trainer.throughput_info(config, model_cfg, s.mesh)
    init_params = trainer.zeros_init(model, (1, 8))

    with s.scope():
        policy_path = checkpoint.policy_checkpoint(config.init_from, run_dir)
        reference = checkpoint.restore_params(policy_path, trainer.abstract_params(init_params, s))
        ref_train = reference_logprobs(model, reference, data.train, batch_size * k)
        selection = preferences.selection_and_test(data.eval)[0]  # the reward model's selection half
        ref_eval = reference_logprobs(model, reference, selection, batch_size * k)
        run_info.update(
            init_from=run_dir,
            policy=os.path.abspath(policy_path),
            data=data.info,
            comparisons_from=os.path.abspath(config.dpo.comparisons_from) if not from_files else "",
        )
        trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
        if jax.process_index() == 0:
            print(
                f"DPO from {run_dir} (beta {config.dpo.beta}): {data.train.num_prompts} train prompts, "
                f"{data.train.num_pairs()} pairs (K={k}); mesh {run_info['mesh']}"
            )
        take = lambda ids: {**data.train.take(ids), "ref_logp": ref_train[ids]}
        batch_fn, step_tokens = batches_lib.train_batch_fn(
            data.train, take, batch_size, config.seed, config.train.length_group, s.batch_sharding
        )

        @jax.jit
        def eval_step(params, batch):
            loss_sum, aux = dpo_loss(params, batch, None, model=model, beta=config.dpo.beta)
            return jnp.stack([loss_sum, aux["accuracy"], aux["weight"]])

        evaluate = batches_lib.ranking_eval_fn(
            eval_step,
            selection,
            batch_size,
            config.train.eval_batches,
            s.batch_sharding,
            "eval",
            extra={"ref_logp": ref_eval},
        )
        if data.info["source"] == "graded_tasks":  # measured on dev prompts, never chooses the checkpoint
            examples = preferences.rl_eval_prompts(
                config.data.tasks, config.dpo.eval_prompts, config.data.task_seed, saved.get("data", {})
            )
            grade = grader_eval_fn(model_cfg, tok, config.template, examples, config.dpo.max_new_tokens)
            heldout, evaluate = evaluate, lambda params: {**heldout(params), **grade(params)}
        tokens_per_step = batch_size * k * data.train.tokens.shape[2]
        task = trainer.Task(
            init_params=init_params,
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            start_params=lambda params: reference,
            loss_fn=functools.partial(dpo_loss, model=model, beta=config.dpo.beta),
            eval_fn=evaluate,
            eval_at_start=True,
            keep_start=False,
            best=("eval_accuracy", "max"),
            step_tokens=step_tokens,
            tokens_per_step=tokens_per_step,
            flops_per_step=run_info["flops_per_token"] * tokens_per_step,
        )
        return trainer.fit(s, task, config, workdir, run_info)
