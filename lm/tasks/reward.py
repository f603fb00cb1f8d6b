"""Reward model: a scalar head on an SFT model's last token, trained on ranked comparisons.

init_from (an SFT workdir, or a checkpoint in one) gives the architecture, the tokenizer, the
chat template and the starting parameters of the model's 'lm' (the SFT run's best/ parameters
when init_from names the run); the head starts at random. One batch element is one prompt with
its K responses: the model scores all K (one [batch * K, seq] forward) and `losses.ranking_loss`
averages -log sigmoid(r_w - r_l - margin) over the prompt's ranked pairs, so each prompt weighs
the same (InstructGPT). The comparisons (`lm.data.preferences`) are built once and kept in
workdir/comparisons.npz: a resumed run trains on the same samples without drawing them again.

Logged: loss and accuracy of each logged training batch; at each eval, and before the first
step, eval_loss and eval_accuracy on the selection half of the held-out comparisons
(`preferences.selection_and_test`), and eval_train_loss and
eval_train_accuracy on as many fixed training comparisons. The parameters with the best
eval_accuracy among the trained steps (not step 0: with the likelihood term that is the SFT
policy's own likelihood, which ranks SFT's samples but prefers whatever is most like SFT) are kept
in workdir/best/ and measured once on the test half (test_accuracy in reward_norm.json). At the
end the best model scores the normalisation set (the SFT policy's samples; for HH and TRL
preference files, the chosen responses; at most
`comparison_batches.NORM_SAMPLES` of them) and workdir/reward_norm.json holds their mean and std,
so that normalised scores (r - mean) / std have mean 0 and std 1 there.
`saved_model.load_reward_model` serves the normalised scores.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm import checkpoint, losses, saved_model, trainer
from lm import metrics as metrics_lib
from lm.data import comparison_batches as batches_lib
from lm.data import preferences
from lm.data.tokenizer import load_tokenizer
from lm.errors import ConfigError
from lm.heads import RewardModel

SOURCES = ("graded_tasks", "hh", "trl")
# config.reward keys that do not change the comparisons (the rest name the cached data).
TRAINING_ONLY_KEYS = ("margin", "likelihood_term")


def validate(config) -> None:
    """The common checks, then one ConfigError naming the first config.reward or data source value
    out of range."""
    trainer.validate(config)
    if config.data.source not in SOURCES:
        raise ConfigError(
            f"config.data.source={config.data.source!r}: a reward model trains on one of {SOURCES}"
        )
    r = config.reward
    checks = [
        ("margin", r.margin >= 0, "must be >= 0"),
        ("label_noise", 0 <= r.label_noise <= 1, "must be in [0, 1]"),
    ]
    if config.data.source == "graded_tasks":
        checks += [
            ("samples_per_prompt", r.samples_per_prompt >= 2, "must be >= 2: a pair needs two responses"),
            ("temperature", r.temperature > 0, "must be positive: greedy samples are all one answer"),
            ("max_new_tokens", r.max_new_tokens >= 1, "must be positive"),
            ("sample_batch", r.sample_batch >= 1, "must be positive"),
            ("num_prompts", r.num_prompts >= 1, "must be positive"),
            ("num_eval_prompts", r.num_eval_prompts >= 1, "must be positive"),
        ]
    else:
        checks += [(key, r[key] >= 0, "must be >= 0 (0: all)") for key in ("num_prompts", "num_eval_prompts")]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"config.reward.{key}={r[key]!r} {why}")


preview = trainer.preview_adopted  # what --print_config can resolve


def fingerprint(config, policy_path: str) -> str:
    """What the comparisons are a function of, as a JSON string."""
    reward = {k: v for k, v in config.reward.to_dict().items() if k not in TRAINING_ONLY_KEYS}
    return json.dumps(
        {
            "data": config.data.to_dict(),
            "reward": reward,
            "template": config.template.to_dict(),
            "policy": os.path.abspath(policy_path),
            "seq_len": config.train.seq_len,
            "seed": config.seed,
        },
        sort_keys=True,
    )


def prepare_comparisons(
    config, tok, model_cfg, policy_params, sft_data_cfg: dict
) -> preferences.PreferenceData:
    """The comparisons of config.data.source, label noise applied to the train split.

    policy_params: `() -> params` of the SFT policy (called only to sample graded-task responses).
    """
    r, seq_len = config.reward, config.train.seq_len
    if config.data.source in ("hh", "trl"):
        data = preferences.pair_comparisons(
            config.data, config.template, tok, seq_len, (r.num_prompts, r.num_eval_prompts)
        )
    else:
        data = preferences.policy_comparisons(
            policy_params(),
            model_cfg,
            tok,
            config.template,
            config.data,
            r,
            sft_data_cfg,
            seq_len,
            config.seed,
        )
    data.train.ranks = preferences.reverse_rankings(
        data.train.ranks, data.train.mask, r.label_noise, config.seed
    )
    data.info["label_noise"] = r.label_noise
    return data


def reward_loss(params, batch, rng, *, model: RewardModel, margin: float):
    """The ranking loss of a batch of prompts: `(loss_sum, {"weight": prompts with a pair,
    "accuracy": per-prompt accuracy sum})`.

    batch: tokens [b, K, seq], first_index, last_index, ranks, mask [b, K].
    """
    b, k, length = batch["tokens"].shape
    scores = model.apply(
        {"params": params},
        batch["tokens"].reshape(b * k, length),
        batch["last_index"].reshape(b * k),
        batch["first_index"].reshape(b * k),
        deterministic=rng is None,
        rngs=None if rng is None else {"dropout": rng},
    )
    loss_sum, accuracy_sum, weight = losses.ranking_loss(
        scores.reshape(b, k), batch["ranks"], batch["mask"], margin
    )
    return loss_sum, {"weight": weight, "accuracy": accuracy_sum}


def write_normalisation(workdir, config, model, data, params, rows: int, batch_sharding, test: dict) -> dict:
    """Scores the normalisation responses with the best model `params`; writes reward_norm.json
    with them and `test` (the best model's test_loss and test_accuracy on the test comparisons)."""
    score_step = jax.jit(
        lambda p, batch: model.apply(
            {"params": p}, batch["tokens"], batch["last_index"][:, 0], batch["first_index"][:, 0]
        )
    )
    ids = batches_lib.norm_rows(len(data.norm_tokens), config.seed)
    scores = batches_lib.score_rows(
        functools.partial(score_step, params),
        data.norm_tokens[ids],
        data.norm_first_index[ids],
        data.norm_last_index[ids],
        rows,
        batch_sharding,
    )
    best_mngr = checkpoint.manager(workdir, keep=1, subdir="best")
    best_meta = checkpoint.restore_meta(best_mngr, best_mngr.latest_step())
    norm = {
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "num_responses": len(scores),
        "responses": "SFT policy samples" if config.data.source == "graded_tasks" else "chosen responses",
        "best_step": best_meta["step"],
        "best_eval_accuracy": best_meta["eval_accuracy"],
        **test,
    }
    if jax.process_index() == 0:
        metrics_lib.write_json_atomic(os.path.join(workdir, saved_model.NORM_FILE), norm)
        print(
            f"best eval_accuracy {norm['best_eval_accuracy']:.4f} at step {norm['best_step']} (selection "
            f"comparisons); test_accuracy {norm['test_accuracy']:.4f}; normalisation over {len(scores)} "
            f"{norm['responses']}: mean {norm['mean']:.4f}, std {norm['std']:.4f}"
        )
    return norm


def run(user_config, workdir: str):
    """Trains (or resumes) a reward model in `workdir`; returns the final train state."""
    run_dir, saved = checkpoint.pretrained_run(user_config.init_from)
    resolved = trainer.adopted(saved, user_config)  # prompts formatted as the policy saw them
    config = trainer.resolve(user_config, resolved)
    seq_len, batch_size = config.train.seq_len, config.train.global_batch_size
    if seq_len > config.model.max_seq_len:
        raise ConfigError(
            f"config.train.seq_len={seq_len} exceeds the SFT model's max_seq_len="
            f"{config.model.max_seq_len} ({run_dir})"
        )
    tok = load_tokenizer(os.path.join(run_dir, "tokenizer"))
    s = trainer.setup(config)
    model_cfg = trainer.model_config(config, tok.vocab_size)
    trainer.check_model_layout(model_cfg, s.mesh)
    model = RewardModel(model_cfg, likelihood_term=config.reward.likelihood_term)
    tx, schedule = trainer.optimizer(config)
    run_info = trainer.throughput_info(config, model_cfg, s.mesh)
    if not config.reward.likelihood_term:  # the score needs no unembedding
        run_info["flops_per_token"] -= 6 * model_cfg.vocab_size * model_cfg.d_model
    zeros = (1,)
    init_params = trainer.zeros_init(model, (1, seq_len), zeros, zeros)

    with s.scope():
        lm_abstract = trainer.abstract_params(init_params, s)["lm"]
        policy_path = checkpoint.policy_checkpoint(config.init_from, run_dir)
        policy = functools.cache(lambda: checkpoint.restore_params(policy_path, lm_abstract))
        data_path = os.path.join(workdir, saved_model.COMPARISONS_FILE)
        key = fingerprint(config, policy_path)
        data = preferences.load(data_path, key)
        if data is None:
            data = prepare_comparisons(config, tok, model_cfg, policy, saved.get("data", {}))
            if jax.process_index() == 0:
                preferences.save(data_path, data, key)
        k = data.train.tokens.shape[1]
        run_info.update(init_from=run_dir, policy=os.path.abspath(policy_path), data=data.info)
        trainer.write_run_files(workdir, user_config, resolved, run_info, tok)
        if jax.process_index() == 0:
            counts = {
                split: f"{data.info[split]['num_prompts']} prompts, {data.info[split]['num_pairs']} pairs"
                for split in ("train", "eval")
            }
            print(
                f"reward model from {run_dir}: {run_info['params']:,} parameters; "
                f"{config.data.source} comparisons (K={k}): train {counts['train']}, eval {counts['eval']}; "
                f"mesh {run_info['mesh']}"
            )

        batch_fn, step_tokens = batches_lib.train_batch_fn(
            data.train, data.train.take, batch_size, config.seed, config.train.length_group, s.batch_sharding
        )

        @jax.jit
        def eval_step(params, batch):
            loss_sum, aux = reward_loss(params, batch, None, model=model, margin=config.reward.margin)
            return jnp.stack([loss_sum, aux["accuracy"], aux["weight"]])

        num_eval = config.train.eval_batches
        selection, test = preferences.selection_and_test(data.eval)
        heldout = batches_lib.ranking_eval_fn(
            eval_step, selection, batch_size, num_eval, s.batch_sharding, "eval"
        )
        shown = selection.num_prompts if num_eval <= 0 else min(num_eval * batch_size, selection.num_prompts)
        train_subset = preferences.Comparisons(
            **data.train.take(np.arange(min(shown, data.train.num_prompts)))
        )
        on_train = batches_lib.ranking_eval_fn(
            eval_step, train_subset, batch_size, 0, s.batch_sharding, "eval_train"
        )
        on_test = batches_lib.ranking_eval_fn(eval_step, test, batch_size, 0, s.batch_sharding, "test")
        tokens_per_step = batch_size * k * seq_len

        def start_params(params):
            started = {**params, "lm": policy()}
            policy.cache_clear()
            return started

        task = trainer.Task(
            init_params=init_params,
            batch_fn=batch_fn,
            tx=tx,
            schedule=schedule,
            start_params=start_params,
            loss_fn=functools.partial(reward_loss, model=model, margin=config.reward.margin),
            eval_fn=lambda params: {**heldout(params), **on_train(params)},
            eval_at_start=True,
            keep_start=False,  # step 0 is the SFT policy's likelihood: it ranks, but it learned nothing
            best=("eval_accuracy", "max"),
            step_tokens=step_tokens,
            tokens_per_step=tokens_per_step,
            flops_per_step=run_info["flops_per_token"] * tokens_per_step,
        )
        state = trainer.fit(s, task, config, workdir, run_info)
        policy.cache_clear()
        best = trainer.restore_like(os.path.join(workdir, "best"), state.params)
        write_normalisation(
            workdir, config, model, data, best, batch_size * k, s.batch_sharding, on_test(best)
        )
    return state
