"""Reward model: a scalar head on an SFT model's last token, trained on ranked comparisons.

init_from (an SFT workdir, or a checkpoint in one) gives the architecture, the tokenizer, the
chat template and the starting parameters of the model's 'lm' (the SFT run's best/ parameters
when init_from names the run); the head starts at random. One batch element is one prompt with
its K responses: the model scores all K (one [batch * K, seq] forward) and `losses.ranking_loss`
averages -log sigmoid(r_w - r_l - margin) over the prompt's ranked pairs, so each prompt weighs
the same (InstructGPT). The comparisons (`lm.data.preferences`) are built once and kept in
workdir/comparisons.npz: a resumed run trains on the same samples without drawing them again.

Logged: loss and accuracy of each logged training batch; at each eval, and before the first
step, eval_loss and eval_accuracy on the held-out comparisons, and eval_train_loss and
eval_train_accuracy on as many fixed training comparisons. The parameters with the best
eval_accuracy are kept in workdir/best/. At the end the best model scores the normalisation set
(the SFT policy's samples; for HH, the chosen responses; at most NORM_SAMPLES of them) and
workdir/reward_norm.json holds their mean and std, so that normalised scores (r - mean) / std have mean 0 and std 1 there.
`load_reward_model` serves the normalised scores.
"""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint, losses, sharding
from lm import metrics as metrics_lib
from lm.data import preferences
from lm.data.tokenizer import load_tokenizer
from lm.errors import CheckpointError, ConfigError
from lm.loop import train_with_evals
from lm.model import RewardModel
from lm.optim import learning_rate_schedule, make_optimizer
from lm.tasks import pretrain, sft
from lm.train_state import init_state, jit_train_step

SOURCES = ("graded_tasks", "hh")
DATA_FILE = "comparisons.npz"
NORM_FILE = "reward_norm.json"
# config.reward keys that do not change the comparisons (the rest name the cached data).
TRAINING_ONLY_KEYS = ("margin", "likelihood_term")
NORM_SAMPLES = 2048  # responses scored for the normalisation


def check_config(config) -> None:
    """ConfigError naming the first config.reward (or data source / init_from) value out of range."""
    if config.data.source not in SOURCES:
        raise ConfigError(f"config.data.source={config.data.source!r}: a reward model trains on one of {SOURCES}")
    if not config.init_from:
        raise ConfigError("config.init_from: a reward model starts from an SFT workdir or a checkpoint in one")
    r = config.reward
    checks = [("margin", r.margin >= 0, "must be >= 0"), ("label_noise", 0 <= r.label_noise <= 1, "must be in [0, 1]")]
    if config.data.source == "graded_tasks":
        checks += [("samples_per_prompt", r.samples_per_prompt >= 2, "must be >= 2: a pair needs two responses"),
                   ("temperature", r.temperature > 0, "must be positive: greedy samples are all one answer"),
                   ("max_new_tokens", r.max_new_tokens >= 1, "must be positive"),
                   ("sample_batch", r.sample_batch >= 1, "must be positive"),
                   ("num_prompts", r.num_prompts >= 1, "must be positive"),
                   ("num_eval_prompts", r.num_eval_prompts >= 1, "must be positive")]
    else:
        checks += [(key, r[key] >= 0, "must be >= 0 (0: all)") for key in ("num_prompts", "num_eval_prompts")]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config.reward.{key}={r[key]!r} {why}")


def policy_checkpoint(init_from: str, run_dir: str) -> str:
    """Where the starting parameters are: run_dir/best/ when init_from names the run and it kept a
    best checkpoint (SFT does), else init_from itself."""
    best = os.path.join(run_dir, "best")
    named_run = os.path.abspath(os.path.expanduser(init_from)) == run_dir
    if named_run and os.path.isdir(best) and any(d.isdigit() for d in os.listdir(best)):
        return best
    return init_from


def fingerprint(config, policy_path: str) -> str:
    """What the comparisons are a function of, as a JSON string."""
    reward = {k: v for k, v in config.reward.to_dict().items() if k not in TRAINING_ONLY_KEYS}
    return json.dumps({"data": config.data.to_dict(), "reward": reward, "template": config.template.to_dict(),
                       "policy": os.path.abspath(policy_path), "seq_len": config.train.seq_len,
                       "seed": config.seed}, sort_keys=True)


def prepare_comparisons(config, tok, model_cfg, policy_params, sft_data_cfg: dict) -> preferences.PreferenceData:
    """The comparisons of config.data.source, label noise applied to the train split.

    policy_params: `() -> params` of the SFT policy (called only to sample graded-task responses).
    """
    r, seq_len = config.reward, config.train.seq_len
    if config.data.source == "hh":
        data = preferences.hh_comparisons(config.data, config.template, tok, seq_len,
                                          (r.num_prompts, r.num_eval_prompts))
    else:
        data = preferences.policy_comparisons(policy_params(), model_cfg, tok, config.template, config.data, r,
                                              sft_data_cfg, seq_len, config.seed)
    data.train.ranks = preferences.reverse_rankings(data.train.ranks, data.train.mask, r.label_noise, config.seed)
    data.info["label_noise"] = r.label_noise
    return data


def reward_loss(params, batch, rng, *, model: RewardModel, margin: float):
    """The ranking loss of a batch of prompts: `(loss_sum, {"weight": prompts with a pair,
    "accuracy": per-prompt accuracy sum})`.

    batch: tokens [b, K, seq], first_index, last_index, ranks, mask [b, K].
    """
    b, k, length = batch["tokens"].shape
    scores = model.apply({"params": params}, batch["tokens"].reshape(b * k, length),
                         batch["last_index"].reshape(b * k), batch["first_index"].reshape(b * k),
                         deterministic=rng is None,
                         rngs=None if rng is None else {"dropout": rng})
    loss_sum, accuracy_sum, weight = losses.ranking_loss(scores.reshape(b, k), batch["ranks"], batch["mask"], margin)
    return loss_sum, {"weight": weight, "accuracy": accuracy_sum}


def eval_batches(comparisons: preferences.Comparisons, batch_size: int, num_batches: int,
                 extra: dict | None = None) -> list[dict]:
    """This process' part of fixed batches of `batch_size` prompts: the first num_batches x
    batch_size prompts (num_batches <= 0: all), in order of length, each batch trimmed to the
    width it needs; rows past the end are masked out. Arrays as `Comparisons.take`, plus the same
    rows of each `extra` per-prompt array ([n, ...], e.g. DPO's reference log-probs)."""
    local = batch_size // jax.process_count()
    used = comparisons.num_prompts if num_batches <= 0 else min(num_batches * batch_size, comparisons.num_prompts)
    lengths = preferences.prompt_lengths(comparisons)[:used]
    order = np.argsort(lengths, kind="stable")
    order = np.concatenate([order, np.zeros(-used % batch_size, order.dtype)])     # padding rows (masked)
    real = np.arange(len(order)) < used
    batches = []
    for start in range(0, len(order), batch_size):
        ids = order[start:start + batch_size]
        width = preferences.batch_width(lengths[ids], comparisons.tokens.shape[2])
        mine = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
        rows = ids[mine]
        batch = {**comparisons.take(rows), **{name: array[rows] for name, array in (extra or {}).items()}}
        batch["mask"] = batch["mask"] & real[start:start + batch_size][mine, None]
        batches.append(preferences.trim(batch, width))
    return batches


def train_batch_fn(comparisons: preferences.Comparisons, take, batch_size: int, seed: int, group: int, batch_sharding):
    """The training batches: `(batch_fn, step_tokens)`. batch_fn: `step -> batch`, the global batch of
    `preferences.grouped_batch_ids` as sharded arrays, trimmed to the width it needs; step_tokens:
    `step -> batch_size x K x width`, for the loop's token counts. take: `ids [b] -> dict of
    arrays` (`Comparisons.take` or an extension of it)."""
    lengths = preferences.prompt_lengths(comparisons)
    local = batch_size // jax.process_count()
    _, k, seq_len = comparisons.tokens.shape

    def ids_and_width(step):
        ids = preferences.grouped_batch_ids(lengths, step, batch_size, seed, group)
        return ids, preferences.batch_width(lengths[ids], seq_len)

    def batch_fn(step):
        ids, width = ids_and_width(step)
        mine = ids[jax.process_index() * local:(jax.process_index() + 1) * local]
        return sharding.global_batch(preferences.trim(take(mine), width), batch_sharding)
    return batch_fn, lambda step: batch_size * k * ids_and_width(step)[1]


def make_eval_fn(eval_step, comparisons, batch_size: int, num_batches: int, batch_sharding, prefix: str,
                 extra: dict | None = None):
    """`params -> {<prefix>_loss, <prefix>_accuracy}`, means over the prompts of fixed batches
    (`eval_step(params, batch)` -> [loss_sum, accuracy_sum, weight])."""
    batches = [sharding.global_batch(b, batch_sharding)
               for b in eval_batches(comparisons, batch_size, num_batches, extra)]

    def evaluate(params):
        totals = np.zeros(3)
        for batch in batches:
            totals += np.asarray(jax.device_get(eval_step(params, batch)))
        loss_sum, accuracy_sum, weight = totals
        return {f"{prefix}_loss": loss_sum / max(weight, 1.0), f"{prefix}_accuracy": accuracy_sum / max(weight, 1.0)}
    return evaluate


def norm_rows(num: int, seed: int) -> np.ndarray:
    """Which of `num` normalisation responses are scored: all up to NORM_SAMPLES, else a seeded
    sample of that many (its mean and std are within a few hundredths of the full set's, at a
    fraction of the forward passes)."""
    if num <= NORM_SAMPLES:
        return np.arange(num)
    return np.sort(np.random.default_rng([seed, 2]).choice(num, NORM_SAMPLES, replace=False))


def score_rows(score_step, tokens: np.ndarray, first_index: np.ndarray, last_index: np.ndarray, rows: int,
               batch_sharding) -> np.ndarray:
    """[m, seq] sequences and [m] first and last response columns -> [m] float64 scores, `rows`
    sequences per call (`preferences.in_length_order`); `score_step` takes {tokens [rows, width],
    first_index, last_index [rows, 1]} as global sharded arrays."""
    local = rows // jax.process_count()

    def call(ids, width):
        mine = ids[jax.process_index() * local:(jax.process_index() + 1) * local]
        batch = sharding.global_batch({"tokens": tokens[mine, :width], "first_index": first_index[mine, None],
                                       "last_index": last_index[mine, None]}, batch_sharding)
        return jax.device_get(score_step(batch))
    return preferences.in_length_order(call, last_index + 1, rows, tokens.shape[1])


def run(config, workdir: str):
    """Trains (or resumes) a reward model in `workdir`; returns the final train state."""
    check_config(config)
    run_dir, saved = checkpoint.pretrained_run(config.init_from)
    sft.adopt_architecture(config, saved)
    for key, value in saved.get("template", {}).items():  # prompts formatted as the policy saw them
        config.template[key] = value
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    if seq_len > config.model.max_seq_len:
        raise ConfigError(f"config.train.seq_len={seq_len} exceeds the SFT model's max_seq_len="
                          f"{config.model.max_seq_len} ({run_dir})")
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.axis_rules(config.axis_rules)
    pretrain.check_batch_layout(config.train, mesh)
    model_cfg = pretrain.model_config(config, tok.vocab_size)
    pretrain.check_model_layout(model_cfg, mesh)
    model = RewardModel(model_cfg, likelihood_term=config.reward.likelihood_term)
    schedule = learning_rate_schedule(config.schedule, config.optimizer.lr, config.train.steps)
    tx = make_optimizer(config.optimizer, schedule)
    throughput = pretrain.throughput_info(config, model_cfg, mesh)
    if not config.reward.likelihood_term:  # the score needs no unembedding
        throughput["flops_per_token"] -= 6 * model_cfg.vocab_size * model_cfg.d_model

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        zeros = jnp.zeros((1,), jnp.int32)
        init_params = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32), zeros, zeros)["params"]
        state, state_shardings = init_state(init_params, tx, config.seed, mesh, rules)
        lm_abstract = checkpoint.abstract_like(state.params["lm"], state_shardings.params["lm"])
        policy_path = policy_checkpoint(config.init_from, run_dir)
        policy = functools.cache(lambda: checkpoint.restore_params(policy_path, lm_abstract))
        data_path, is_main = os.path.join(workdir, DATA_FILE), jax.process_index() == 0
        key = fingerprint(config, policy_path)
        data = preferences.load(data_path, key)
        if data is None:
            data = prepare_comparisons(config, tok, model_cfg, policy, saved.get("data", {}))
            if is_main:
                preferences.save(data_path, data, key)
        k = data.train.tokens.shape[1]
        tokens_per_step = batch_size * k * seq_len
        run_info = {**throughput, "init_from": run_dir, "policy": os.path.abspath(policy_path), "data": data.info}
        if is_main:
            tok.save(os.path.join(workdir, "tokenizer"))
            metrics_lib.write_json_atomic(os.path.join(workdir, "config.json"), {**config.to_dict(), "run": run_info})
            counts = {split: f"{data.info[split]['num_prompts']} prompts, {data.info[split]['num_pairs']} pairs"
                      for split in ("train", "eval")}
            print(f"reward model from {run_dir}: {run_info['params']['total']:,} parameters; {config.data.source} "
                  f"comparisons (K={k}): train {counts['train']}, eval {counts['eval']}; mesh {run_info['mesh']}")

        mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
        step, restored = checkpoint.restore(mngr, checkpoint.abstract_like(state, state_shardings))
        if restored is not None:
            state = restored
            print(f"resumed from step {step}")
        else:
            params = {**state.params, "lm": policy()}
            opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
            state = state.replace(params=params, opt_state=opt_state)
        policy.cache_clear()
        batch_sharding = sharding.batch_sharding(mesh, rules)
        loss_fn = functools.partial(reward_loss, model=model, margin=config.reward.margin)
        step_fn = jit_train_step(loss_fn, tx, schedule, config.train.grad_accum, state_shardings,
                                   batch_sharding, mesh)

        batch_fn, step_tokens = train_batch_fn(data.train, data.train.take, batch_size, config.seed,
                                               config.train.length_group, batch_sharding)

        @jax.jit
        def eval_step(params, batch):
            loss_sum, aux = reward_loss(params, batch, None, model=model, margin=config.reward.margin)
            return jnp.stack([loss_sum, aux["accuracy"], aux["weight"]])

        num_eval = config.train.eval_batches
        heldout = make_eval_fn(eval_step, data.eval, batch_size, num_eval, batch_sharding, "eval")
        shown = data.eval.num_prompts if num_eval <= 0 else min(num_eval * batch_size, data.eval.num_prompts)
        train_subset = preferences.Comparisons(**data.train.take(np.arange(min(shown, data.train.num_prompts))))
        on_train = make_eval_fn(eval_step, train_subset, batch_size, 0, batch_sharding, "eval_train")
        evaluate = lambda params: {**heldout(params), **on_train(params)}
        keep_best = sft.best_keeper(workdir, "eval_accuracy", "max")
        state = train_with_evals(state, workdir=workdir, eval_fn=evaluate, after_eval=keep_best,
                                 step_fn=step_fn, batch_fn=batch_fn, train_cfg=config.train,
                                 ckpt_mngr=mngr, meta={"config": config.to_dict(), "run": run_info},
                                 tokens_per_step=tokens_per_step, step_tokens=step_tokens,
                                 flops_per_step=run_info["flops_per_token"] * tokens_per_step,
                                 peak_flops=run_info["peak_flops_per_device"] * jax.device_count())

        best_dir = os.path.join(workdir, "best")
        best_params = checkpoint.restore_params(best_dir, checkpoint.abstract_like(state.params, state_shardings.params))
        score_step = jax.jit(lambda p, batch: model.apply({"params": p}, batch["tokens"], batch["last_index"][:, 0],
                                                          batch["first_index"][:, 0]),
                             out_shardings=sharding.replicated(mesh))
        rows = norm_rows(len(data.norm_tokens), config.seed)
        scores = score_rows(functools.partial(score_step, best_params), data.norm_tokens[rows], data.norm_first_index[rows],
                            data.norm_last_index[rows], batch_size * k, batch_sharding)
        best_mngr = checkpoint.manager(workdir, keep=1, subdir="best")
        best_meta = checkpoint.restore_meta(best_mngr, best_mngr.latest_step())
        norm = {"mean": float(scores.mean()), "std": float(scores.std()), "num_responses": len(scores),
                "responses": "SFT policy samples" if config.data.source == "graded_tasks" else "chosen responses",
                "best_step": best_meta["step"], "best_eval_accuracy": best_meta["eval_accuracy"]}
        if is_main:
            metrics_lib.write_json_atomic(os.path.join(workdir, NORM_FILE), norm)
            print(f"best eval_accuracy {norm['best_eval_accuracy']:.4f} at step {norm['best_step']}; "
                  f"normalisation over {len(scores)} {norm['responses']}: mean {norm['mean']:.4f}, std {norm['std']:.4f}")
    return state


def restore_reward_model(workdir: str):
    """The best reward model of a finished run and its normalisation, on the first device.

    Returns:
      (model: RewardModel, params, norm: {"mean", "std", ...} of workdir/reward_norm.json, config).
    """
    from lm.saved_model import read_config
    config, _ = read_config(workdir)
    norm = metrics_lib.read_json(os.path.join(workdir, NORM_FILE))
    if norm is None:
        raise CheckpointError(f"{workdir}: no {NORM_FILE} (not a finished reward-model run?)")
    tok = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model = RewardModel(pretrain.model_config(config, tok.vocab_size), likelihood_term=config.reward.likelihood_term)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.axis_rules(config.axis_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        zeros = jnp.zeros((1,), jnp.int32)
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                                                    zeros, zeros)["params"])
        abstract = checkpoint.abstract_like(sharding.unboxed(boxed), sharding.tree_shardings(boxed, mesh, rules))
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
    scores = jax.jit(lambda p, tokens, first, last: (model.apply({"params": p}, tokens, last, first) - mean) / std)

    def score_fn(tokens, first_index, last_index):
        return scores(params, *(jnp.asarray(x, jnp.int32) for x in (tokens, first_index, last_index)))
    return score_fn
