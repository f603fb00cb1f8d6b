"""DPO (Rafailov et al. 2023) on the reward model's comparisons: the policy is its own reward model.

The implicit reward of a response is r = beta * (log pi(y|x) - log pi_ref(y|x)) with pi_ref the
frozen SFT policy. For K ranked responses per prompt the loss is `losses.ranking_loss` on these
r, exactly the reward model's loss (for K = 2 it is DPO's -log sigmoid(r_w - r_l)). Log-probs are
summed over the whole sequence after BOS: the prompt's terms are the same for every response of a
prompt under a given model, so they cancel in every pair difference, from the loss and from its
gradient. The reference log-probs are computed once, before training.

Data: `dpo.comparisons_from` names a reward-model workdir whose comparisons.npz (the SFT policy's
samples ranked by the oracle, or HH pairs) DPO reuses, so DPO and the reward model learn from the
same preferences. Evaluated like SFT: held-out comparison loss and accuracy, and where the
comparisons come from graded tasks (their info['source']), the graded score of greedy answers to
held-out prompts; best/ keeps the policy with the best graded score, or for HH pairs (no grader)
the best held-out comparison accuracy (eval_accuracy).
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint, losses, rl, sharding
from lm import metrics as metrics_lib
from lm.data import preferences
from lm.data.tokenizer import load_tokenizer
from lm.errors import ConfigError
from lm.loop import train_with_evals
from lm.model import Transformer
from lm.optim import learning_rate_schedule, make_optimizer
from lm.tasks import pretrain, reward, sft
from lm.train_state import init_state, jit_train_step


def sequence_logprobs(model, params, tokens, last_index):
    """Sum of log pi(token) over columns 1..last_index of right-padded sequences.

    Args:
      tokens: [b, seq] int32; last_index: [b] int32 column of each row's last token (its EOS).
    Returns:
      [b] float32.
    """
    column = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    segments = (column <= last_index[:, None]).astype(jnp.int32)
    logits = model.apply({"params": params}, tokens, segment_ids=segments)
    logp = rl.token_logprobs(logits[:, :-1], tokens[:, 1:])                  # [b, seq - 1]
    return jnp.sum(jnp.where(column[:, 1:] <= last_index[:, None], logp, 0.0), axis=1)


def dpo_loss(params, batch, rng, *, model, beta: float):
    """`(loss_sum, {"weight", "accuracy"})` of `losses.ranking_loss` on implicit rewards.

    batch: tokens [b, K, seq], last_index, ranks, ref_logp [b, K], mask [b, K].
    """
    b, k, length = batch["tokens"].shape
    logp = sequence_logprobs(model, params, batch["tokens"].reshape(b * k, length),
                             batch["last_index"].reshape(b * k)).reshape(b, k)
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


def with_reference(comparisons: preferences.Comparisons, ref_logp: np.ndarray):
    """`take(ids)` of the comparisons plus their ref_logp [b, K]."""
    def take(ids):
        return {**comparisons.take(ids), "ref_logp": ref_logp[ids].astype(np.float32)}
    return take


def run(config, workdir: str):
    """DPO from the SFT workdir `init_from` on the comparisons of `dpo.comparisons_from`."""
    if not config.init_from:
        raise ConfigError("config.init_from: DPO starts from an SFT workdir")
    if not config.dpo.comparisons_from:
        raise ConfigError("config.dpo.comparisons_from: DPO reuses a reward-model workdir's comparisons")
    if config.dpo.beta <= 0:
        raise ConfigError(f"config.dpo.beta={config.dpo.beta} must be positive")
    data = preferences.load(os.path.join(config.dpo.comparisons_from, reward.DATA_FILE))
    if data is None:
        raise ConfigError(f"config.dpo.comparisons_from={config.dpo.comparisons_from!r}: no "
                          f"{reward.DATA_FILE} there (not a reward-model workdir?)")
    run_dir, saved = checkpoint.pretrained_run(config.init_from)
    sft.adopt_architecture(config, saved)
    for key, value in saved.get("template", {}).items():
        config.template[key] = value
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    pretrain.check_batch_layout(config.train, mesh)
    model_cfg = pretrain.model_config(config, tok.vocab_size)
    pretrain.check_model_layout(model_cfg, mesh)
    model = Transformer(model_cfg)
    batch_size, k = config.train.global_batch_size, data.train.tokens.shape[1]
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    throughput = pretrain.throughput_info(config, model_cfg, mesh)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init_params = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
        state, state_shardings = init_state(init_params, tx, config.seed, mesh, rules)
        policy_path = reward.policy_checkpoint(config.init_from, run_dir)
        reference = checkpoint.restore_params(policy_path,
                                                checkpoint.abstract_like(state.params, state_shardings.params))
        ref_train = reference_logprobs(model, reference, data.train, batch_size * k)
        ref_eval = reference_logprobs(model, reference, data.eval, batch_size * k)
        tokens_per_step = batch_size * k * data.train.tokens.shape[2]
        run_info = {**throughput, "init_from": run_dir, "policy": os.path.abspath(policy_path),
                    "comparisons_from": os.path.abspath(config.dpo.comparisons_from), "data": data.info}
        if jax.process_index() == 0:
            tok.save(os.path.join(workdir, "tokenizer"))
            metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"), {**config.to_dict(), "run": run_info})
            print(f"DPO from {run_dir} (beta {config.dpo.beta}): {data.train.num_prompts} train prompts, "
                  f"{data.train.num_pairs()} pairs (K={k}); mesh {run_info['mesh']}")
        mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
        step, restored = checkpoint.restore(mngr, checkpoint.abstract_like(state, state_shardings))
        if restored is not None:
            state = restored
            print(f"resumed from step {step}")
        else:
            opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(reference)
            state = state.replace(params=reference, opt_state=opt_state)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        loss_fn = functools.partial(dpo_loss, model=model, beta=config.dpo.beta)
        step_fn = jit_train_step(loss_fn, tx, schedule, config.train.grad_accum, state_shardings, batch_sharding, mesh)
        batch_fn, step_tokens = reward.train_batch_fn(data.train, with_reference(data.train, ref_train), batch_size,
                                                      config.seed, config.train.length_group, batch_sharding)

        @jax.jit
        def eval_step(params, batch):
            loss_sum, aux = dpo_loss(params, batch, None, model=model, beta=config.dpo.beta)
            return jnp.stack([loss_sum, aux["accuracy"], aux["weight"]])

        heldout = reward.make_eval_fn(eval_step, data.eval, batch_size, config.train.eval_batches, batch_sharding,
                                        "eval", extra={"ref_logp": ref_eval.astype(np.float32)})
        if data.info["source"] == "graded_tasks":
            examples = preferences.rl_eval_prompts(config.data.tasks, config.sft.eval_prompts, config.data.task_seed,
                                                   saved.get("data", {}))
            grade = sft.grader_eval_fn(model_cfg, tok, config.template, examples, config.sft.max_new_tokens)
            evaluate = lambda params: {**heldout(params), **grade(params)}
            keep_best = sft.best_keeper(workdir, "eval_grader_score", "max")
        else:  # HH pairs: no grader
            evaluate = heldout
            keep_best = sft.best_keeper(workdir, "eval_accuracy", "max")
        state = train_with_evals(state, workdir=workdir, eval_fn=evaluate, after_eval=keep_best,
                                 step_fn=step_fn, batch_fn=batch_fn, train_cfg=config.train,
                                 ckpt_mngr=mngr, meta={"config": config.to_dict(), "run": run_info},
                                 tokens_per_step=tokens_per_step, step_tokens=step_tokens,
                                 flops_per_step=run_info["flops_per_token"] * tokens_per_step,
                                 peak_flops=run_info["peak_flops_per_device"] * jax.device_count())
    return state

