"""The InstructGPT recipe in one command: pretrain -> SFT -> reward model -> PPO, with GRPO, DPO and
best-of-n beside PPO against the same reward model, and PPO and GRPO trained on the grader itself
(ppo_oracle, grpo_oracle: the verifiable-reward rows); each stage in DIR/<stage>/ initialised from
the stage before, then a report.

Which data chooses what: SFT keeps its best checkpoint on its own eval prompts; the reward model
on the selection half of its held-out comparisons, its rm_accuracy measured once on the test half;
the RL stages on dev prompts (held out, none of SFT's), by the reward model's score (ppo, grpo),
by held-out comparison accuracy (dpo) or by the grader (the *_oracle stages, whose reward it is).
The report's test prompts are none of SFT's eval prompts and none of any stage's dev prompts, and
nothing chooses on them.

A stage runs as its own `experiments.run` subprocess (so a crash or a kill loses only that stage's
progress since its last checkpoint) and is skipped once its status.json says completed; the
recipe's PASSED keys (graded tasks, HH data files) reach the stages that take them as overrides.
The report compares every policy with SFT on held-out prompts (lm.evaluation) and writes
DIR/report.md and DIR/report.json. config.recipe.source says which prompts and judges: graded
tasks are scored by the oracle (the grader; win rates against SFT) and by the reward model, HH
dialogues by the reward model alone (the oracle fields are null).
"""

import dataclasses
import os
import sys
from collections.abc import Callable

import jax
import numpy as np

from experiments import sweep
from lm import checkpoint, evaluation, saved_model
from lm import metrics as metrics_lib
from lm.data import preferences
from lm.data import sft as sft_data
from lm.errors import ConfigError, DataError

STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo", "ppo_oracle", "grpo_oracle")
POLICY_STAGES = ("ppo", "grpo", "dpo", "ppo_oracle", "grpo_oracle")  # reported against SFT
SOURCES = ("graded_tasks", "hh")  # config.recipe.source
# recipe key -> (the stage config key it sets, the stages that take it); passed where the recipe sets it.
PASSED = {
    "tasks": ("data.tasks", ("reward", "ppo", "grpo", "dpo", "ppo_oracle", "grpo_oracle")),
    "data_files": ("data.files", ("sft", "reward", "ppo", "grpo")),
}
# Which earlier stages a stage's config keys point at.
LINKS = {
    "sft": {"init_from": "pretrain"},
    "reward": {"init_from": "sft"},
    "ppo": {"init_from": "sft", "ppo.reward_from": "reward"},
    "grpo": {"init_from": "sft", "grpo.reward_from": "reward"},
    "dpo": {"init_from": "sft", "dpo.comparisons_from": "reward"},
    "ppo_oracle": {"init_from": "sft", "ppo.reward_from": "reward"},
    "grpo_oracle": {"init_from": "sft", "grpo.reward_from": "reward"},
}
# Which data every figure of the report comes from (report.json "sources").
SOURCES_OF_FIGURES = {
    "policies": "test prompts: held out, none of SFT's eval prompts, the reward model's comparisons or any "
    "stage's dev prompts; greedy answers (oracle_score, win_rate_vs_sft, rm_score) and temperature-1 "
    "samples (*_sampled, kl_to_sft)",
    "rm_accuracy": "the kept reward model on the test half of its held-out comparisons (the selection half "
    "chose the checkpoint)",
    "checkpoints": "ppo, grpo: the reward model's score on dev prompts; dpo: held-out comparison accuracy; "
    "ppo_oracle, grpo_oracle: the grader on dev prompts; sft: the grader on its own eval prompts",
}
EXTRA_FIELDS = ("oracle_score_by_task",)  # in report.json beside the fields, where they apply
REPORT_FIELDS = (
    "oracle_score",
    "oracle_score_sampled",
    "win_rate_vs_sft",
    "win_rate_ci",
    "tie_rate",
    "kl_to_sft",
    "rm_accuracy",
    "rm_score",
    "rm_score_sampled",
)


def validate(config) -> None:
    """One clear line for a recipe that cannot run: an unknown source, HH without its data, or W&B
    logging without wandb installed."""
    metrics_lib.check_wandb(config.get("logging"))
    source = config.recipe.source
    if source not in SOURCES:
        raise ConfigError(f"config.recipe.source={source!r}: expected one of {SOURCES}")
    if source == "hh" and not config.recipe.get("data_files"):
        raise ConfigError(
            "config.recipe.data_files is empty: set it to the HH .jsonl/.json file(s) of "
            '{"chosen", "rejected"} transcripts (a glob or a comma-separated list)'
        )


def stage_command(spec: str, stage_dir: str, links: dict, recipe_dir: str, overrides: tuple) -> list[str]:
    """The `experiments.run` command line of one stage."""
    command = [sys.executable, "-m", "experiments.run", f"--config={spec}", f"--workdir={stage_dir}"]
    command += [f"--config.{key}={os.path.join(recipe_dir, stage)}" for key, stage in links.items()]
    return command + list(overrides)


def stage_overrides(config, stage: str, workdir: str = "") -> list[str]:
    """The `--config.` overrides the recipe gives `stage`: its seed, each PASSED recipe key that is
    set and that the stage takes, and with config.logging.wandb_project set the logging keys that
    are set (wandb_group defaults to the name of the recipe's `workdir`, so its stages group; a
    wandb_run_name N names the stage's run N-<stage>, else it is named <stage>)."""
    overrides = [f"--config.seed={config.seed}"]
    for name, (key, stages) in PASSED.items():
        if stage in stages and config.recipe.get(name):
            overrides.append(f"--config.{key}={config.recipe[name]}")
    if "logging" in config and config.logging.wandb_project:
        group = config.logging.wandb_group or os.path.basename(os.path.normpath(workdir or "."))
        name = config.logging.wandb_run_name
        logging = {
            **config.logging.to_dict(),
            "wandb_group": group,
            "wandb_run_name": name and f"{name}-{stage}",
        }
        overrides += [f"--config.logging.{key}={value}" for key, value in logging.items() if value]
    return overrides


def run_stages(config, workdir: str) -> None:
    """Runs every stage not yet completed, in order; ConfigError names the first that fails."""
    for stage in STAGES:
        spec = config.recipe.get(stage, "")
        if not spec:
            continue
        stage_dir = os.path.join(workdir, stage)
        status = (metrics_lib.read_json(os.path.join(stage_dir, "status.json")) or {}).get("status")
        if status == "completed":
            print(f"{stage}: completed earlier, skipped")
            continue
        overrides = tuple(stage_overrides(config, stage, workdir))
        command = stage_command(spec, stage_dir, LINKS.get(stage, {}), workdir, overrides)
        print(f"{stage}: {' '.join(command[2:])}", flush=True)
        if sweep.run_member(command, stage_dir) != "completed":
            error = (metrics_lib.read_json(os.path.join(stage_dir, "status.json")) or {}).get("error", "")
            raise ConfigError(f"recipe stage {stage} failed ({error}); its log: {stage_dir}/log.txt")


def report_prompts(config, sft, workdir: str) -> list[dict]:
    """The report's held-out examples (dicts with 'prompt'; graded tasks' also 'task' and 'meta')
    of config.recipe.source, for the SFT run `sft` (a SavedModel)."""
    if config.recipe.source == "hh":
        return hh_report_prompts(config, sft)
    return graded_report_prompts(config, sft.config, workdir)


def graded_report_prompts(config, sft_config, workdir: str) -> list[dict]:
    """Held-out test prompts for the report: the validation side of the recipe's tasks (all of SFT's
    when recipe.tasks is empty), from a seed no stage uses, minus every prompt a stage trained or
    chose on (`chosen_on`)."""
    tasks = config.recipe.tasks or sft_config.data.tasks
    exclude = chosen_on(workdir, sft_config.data.to_dict())
    return preferences.held_out_prompts(
        tasks, config.recipe.eval_prompts, sft_config.data.task_seed + 7, exclude
    )


def chosen_on(workdir: str, sft_data: dict) -> set[str]:
    """The held-out prompts the stages in `workdir` used: SFT's eval prompts (its checkpoint), the
    reward model's comparisons (train, selection and test), and each RL stage's dev prompts."""
    used = set(preferences.sft_heldout_prompts(sft_data))
    for stage in ("reward", *POLICY_STAGES):
        if not os.path.isfile(os.path.join(workdir, stage, "config.json")):
            continue
        c = checkpoint.read_run_config(os.path.join(workdir, stage))
        data = c["data"]
        if stage == "reward":
            num = int(c["reward"]["num_prompts"]) + int(c["reward"]["num_eval_prompts"])
            examples = preferences.held_out_prompts(data["tasks"], num, int(data["task_seed"]), used)
        else:
            examples = preferences.rl_eval_prompts(
                data["tasks"], int(c[c["task"]]["eval_prompts"]), int(data["task_seed"]), sft_data
            )
        used |= {e["prompt"] for e in examples}
    return used


def hh_report_prompts(config, sft) -> list[dict]:
    """Held-out prompts for the report: the first recipe.eval_prompts distinct prompts of the HH
    builder's 'validation' split (the SFT run's data config: its files and split) that leave
    recipe.max_new_tokens positions in the SFT model. The earlier stages chose their best
    checkpoints on this split too (the builder has no third one)."""
    texts = preferences.hh_prompts(sft.config.data, "validation")
    room = sft.model_cfg.max_seq_len - config.recipe.max_new_tokens
    kept, skipped = sft_data.prompts_that_fit(sft.tokenizer, sft.config.template, texts, room)
    if not kept:
        raise DataError(
            f"config.recipe.max_new_tokens={config.recipe.max_new_tokens}: no held-out HH prompt "
            f"fits the SFT model's {sft.model_cfg.max_seq_len} positions with it ({skipped} longer)"
        )
    return [{"prompt": p} for p in kept[: config.recipe.eval_prompts]]


@dataclasses.dataclass
class Judges:
    """How the report scores [n] responses (token lists) to its n prompts: `oracle` (graded tasks)
    and `rm` (where there is a reward model), each `responses -> [n] scores` or None; `baseline`:
    the [n] oracle scores of SFT's greedy responses (win rates), None without an oracle."""

    examples: list[dict]
    oracle: Callable | None
    rm: Callable | None
    baseline: np.ndarray | None


def make_judges(examples, prompts, tokenizer, score_fn, sft_greedy, *, graded: bool) -> Judges:
    """The report's Judges on [n] examples and their [n] prompt token lists: the grader when
    `graded`, the reward model's normalised `score_fn` (`saved_model.load_reward_model`) unless None."""

    def grade(responses):
        return evaluation.oracle_scores(examples, evaluation.decode(tokenizer, responses))

    def score(responses):
        return evaluation.rm_scores(score_fn, prompts, responses, pad_id=tokenizer.pad_id)

    return Judges(
        examples,
        grade if graded else None,
        None if score_fn is None else score,
        grade(sft_greedy) if graded else None,
    )


def score_fields(judges: Judges, greedy, sampled, seed: int) -> dict:
    """The report fields of one policy's [n] greedy and [n] sampled responses: oracle scores, win
    rate against SFT and scores by task (with an oracle), rm_score and rm_score_sampled (with an RM)."""
    row = {}
    if judges.oracle is not None:
        scores = judges.oracle(greedy)
        row.update(
            oracle_score=float(scores.mean()),
            oracle_score_sampled=float(judges.oracle(sampled).mean()),
            **_versus(scores, judges.baseline, seed),
            oracle_score_by_task=by_task(judges.examples, scores),
        )
    if judges.rm is not None:
        row.update(
            rm_score=float(judges.rm(greedy).mean()), rm_score_sampled=float(judges.rm(sampled).mean())
        )
    return row


def policy_responses(policy, tokenizer, prompts, *, max_new_tokens: int, seed: int) -> tuple[list, list]:
    """[n] greedy and [n] temperature-1 responses (token lists, EOS-ended when they end) of
    `policy` (a SavedModel) to [n] prompts; the samples draw from PRNGKey(seed + 1)."""
    kw = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    greedy = evaluation.sample_responses(
        policy.params, policy.model_cfg, prompts, rng=jax.random.PRNGKey(seed), temperature=0.0, **kw
    )
    sampled = evaluation.sample_responses(
        policy.params, policy.model_cfg, prompts, rng=jax.random.PRNGKey(seed + 1), temperature=1.0, **kw
    )
    return greedy, sampled


def stage_report(policy, sft, prompts, responses, judges: Judges, *, max_new_tokens: int, seed: int) -> dict:
    """`score_fields` of one policy's (greedy, sampled) `responses` and its KL to SFT on its samples."""
    greedy, sampled = responses
    tok = sft.tokenizer
    kl = evaluation.kl_to_reference(
        policy.model_cfg,
        policy.params,
        sft.params,
        prompts,
        sampled,
        pad_id=tok.pad_id,
        eos_id=tok.eos_id,
        width=max_new_tokens,
    )
    return {**score_fields(judges, greedy, sampled, seed), "kl_to_sft": kl}


def by_task(examples: list[dict], scores: np.ndarray) -> dict:
    """{task: mean oracle score of its prompts} for [n] examples and their [n] scores."""
    tasks = [e["task"] for e in examples]
    return {
        task: float(np.mean([s for t, s in zip(tasks, scores) if t == task])) for task in dict.fromkeys(tasks)
    }


def _versus(scores, sft_scores, seed) -> dict:
    versus = evaluation.win_rate(scores, sft_scores, seed=seed)
    return {
        "win_rate_vs_sft": versus["win_rate"],
        "win_rate_ci": versus["win_rate_ci"],
        "tie_rate": versus["tie_rate"],
    }


def best_of_n_report(
    sft, score_fn, prompts, judges: Judges, *, n: int, max_new_tokens: int, seed: int
) -> dict:
    """Best-of-n against the reward model, on the SFT policy's samples at temperature 1: the
    scores of the chosen samples (greedy and sampled fields alike) and the analytic KL."""
    tok = sft.tokenizer
    samples = evaluation.sample_responses(
        sft.params,
        sft.model_cfg,
        [p for p in prompts for _ in range(n)],
        max_new_tokens=max_new_tokens,
        rng=jax.random.PRNGKey(seed + 2),
        temperature=1.0,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    groups = [samples[i * n : (i + 1) * n] for i in range(len(prompts))]
    chosen = evaluation.best_of_n(score_fn, prompts, groups, pad_id=tok.pad_id)
    picked = [g[c] for g, c in zip(groups, chosen)]
    return {**score_fields(judges, picked, picked, seed), "kl_to_sft": evaluation.best_of_n_kl(n)}


def make_report(config, workdir: str) -> dict:
    """Evaluates SFT, PPO, DPO and best-of-n on the report prompts; writes report.json and report.md."""
    sft = saved_model.load(os.path.join(workdir, "sft"))
    tok = sft.tokenizer
    examples = report_prompts(config, sft, workdir)
    prompts = evaluation.encode_prompts(examples, tok, sft.config.template)
    width, seed = config.recipe.max_new_tokens, config.seed
    rm_dir = os.path.join(workdir, "reward")
    score_fn = saved_model.load_reward_model(rm_dir)[0] if os.path.isdir(rm_dir) else None
    responses = policy_responses(sft, tok, prompts, max_new_tokens=width, seed=seed)
    judges = make_judges(
        examples, prompts, tok, score_fn, responses[0], graded=config.recipe.source == "graded_tasks"
    )
    stages = {"sft": stage_report(sft, sft, prompts, responses, judges, max_new_tokens=width, seed=seed)}
    if score_fn is not None:
        stages["reward"] = {"rm_accuracy": reward_accuracy(rm_dir)}
        stages["best_of_n"] = best_of_n_report(
            sft, score_fn, prompts, judges, n=config.recipe.best_of_n, max_new_tokens=width, seed=seed
        )
    for stage in POLICY_STAGES:
        if os.path.isdir(os.path.join(workdir, stage, "best")):
            policy = saved_model.load(os.path.join(workdir, stage), "best")
            responses = policy_responses(policy, tok, prompts, max_new_tokens=width, seed=seed)
            stages[stage] = stage_report(
                policy, sft, prompts, responses, judges, max_new_tokens=width, seed=seed
            )
    report = {
        "stages": {
            name: {f: row.get(f) for f in REPORT_FIELDS} | {f: row[f] for f in EXTRA_FIELDS if f in row}
            for name, row in stages.items()
        },
        "num_prompts": len(examples),
        "best_of_n": config.recipe.best_of_n,
        "sources": SOURCES_OF_FIGURES,
    }
    metrics_lib.write_json_atomic(os.path.join(workdir, "report.json"), report)
    write_markdown(os.path.join(workdir, "report.md"), report)
    return report


def reward_accuracy(rm_dir: str) -> float | None:
    """The kept reward model's accuracy on its test comparisons (reward_norm.json's test_accuracy),
    measured once after the selection half chose the checkpoint."""
    return (metrics_lib.read_json(os.path.join(rm_dir, saved_model.NORM_FILE)) or {}).get("test_accuracy")


def write_markdown(path: str, report: dict) -> None:
    """A paper-style table of `report` (atomic); fields null in every row (HH's oracle fields) are
    left out."""

    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, list):
            return f"[{value[0]:.3f}, {value[1]:.3f}]"
        return f"{value:.3f}"

    fields = [f for f in REPORT_FIELDS if any(row[f] is not None for row in report["stages"].values())]
    lines = [
        f"Held-out test prompts: {report['num_prompts']}; best-of-n: n = {report['best_of_n']}.",
        "",
        "| stage | " + " | ".join(fields) + " |",
        "|---|" + "---:|" * len(fields),
    ]
    lines += [
        f"| {name} | " + " | ".join(cell(row[f]) for f in fields) + " |"
        for name, row in report["stages"].items()
    ]
    per_task = {
        name: row["oracle_score_by_task"]
        for name, row in report["stages"].items()
        if row.get("oracle_score_by_task")
    }
    if per_task:
        tasks = list(next(iter(per_task.values())))
        lines += [
            "",
            "Oracle score (greedy) by task:",
            "",
            "| stage | " + " | ".join(tasks) + " |",
            "|---|" + "---:|" * len(tasks),
        ]
        lines += [
            f"| {name} | " + " | ".join(cell(row.get(t)) for t in tasks) + " |"
            for name, row in per_task.items()
        ]
    lines += ["", "Where each figure comes from:", ""]
    lines += [f"- {what}: {source}" for what, source in report.get("sources", {}).items()]
    metrics_lib.write_atomic(path, "\n".join(lines) + "\n")


def run(config, workdir: str) -> dict:
    """Runs the stages still to run, then writes the report; returns it."""
    run_stages(config, workdir)
    report = make_report(config, workdir)
    print(open(os.path.join(workdir, "report.md")).read())
    return report
