"""The InstructGPT recipe in one command: pretrain -> SFT -> reward model -> PPO, with DPO and
best-of-n beside PPO, each stage in DIR/<stage>/ initialised from the stage before, then a report.

A stage runs as its own `experiments.run` subprocess (so a crash or a kill loses only that stage's
progress since its last checkpoint) and is skipped once its status.json says completed. The
report compares every policy with SFT on held-out prompts against the oracle (lm.evaluation) and
writes DIR/report.md and DIR/report.json.
"""
import os
import sys

import jax
import numpy as np

from experiments import sweep
from lm import evaluation, saved_model
from lm import metrics as metrics_lib
from lm.data import graded_tasks
from lm.errors import ConfigError
from lm.tasks import reward as reward_task

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")
RL_STAGES = ("reward", "ppo", "dpo")  # they take the recipe's tasks
# Which earlier stages a stage's config keys point at.
LINKS = {"sft": {"init_from": "pretrain"}, "reward": {"init_from": "sft"},
         "ppo": {"init_from": "sft", "ppo.reward_from": "reward"}, "dpo": {"init_from": "sft", "dpo.comparisons_from": "reward"}}
EXTRA_FIELDS = ("oracle_score_by_task",)  # in report.json beside the fields, where they apply
REPORT_FIELDS = ("oracle_score", "oracle_score_sampled", "win_rate_vs_sft", "win_rate_ci", "tie_rate",
                 "kl_to_sft", "rm_accuracy")


def stage_command(spec: str, stage_dir: str, links: dict, recipe_dir: str, overrides: tuple) -> list[str]:
    """The `experiments.run` command line of one stage."""
    command = [sys.executable, "-m", "experiments.run", f"--config={spec}", f"--workdir={stage_dir}"]
    command += [f"--config.{key}={os.path.join(recipe_dir, stage)}" for key, stage in links.items()]
    return command + list(overrides)


def run_stages(config, workdir: str) -> None:
    """Runs every stage not yet completed, in order; ConfigError names the first that fails."""
    for stage in STAGES:
        spec = config.recipe[stage]
        if not spec:
            continue
        stage_dir = os.path.join(workdir, stage)
        status = (metrics_lib.read_json(os.path.join(stage_dir, "status.json")) or {}).get("status")
        if status == "completed":
            print(f"{stage}: completed earlier, skipped")
            continue
        overrides = [f"--config.seed={config.seed}"]
        if stage in RL_STAGES and config.recipe.tasks:
            overrides.append(f"--config.data.tasks={config.recipe.tasks}")
        command = stage_command(spec, stage_dir, LINKS.get(stage, {}), workdir, tuple(overrides))
        print(f"{stage}: {' '.join(command[2:])}", flush=True)
        if sweep.run_member(command, stage_dir) != "completed":
            error = (metrics_lib.read_json(os.path.join(stage_dir, "status.json")) or {}).get("error", "")
            raise ConfigError(f"recipe stage {stage} failed ({error}); its log: {stage_dir}/log.txt")


def report_prompts(config, sft_config) -> list[dict]:
    """Held-out prompts for the report: the validation side of the recipe's tasks (all of SFT's
    when recipe.tasks is empty), from a seed no stage uses, minus the SFT run's own eval prompts
    (it chose its best checkpoint on them)."""
    seen = {e["prompt"] for e in graded_tasks.make_examples(sft_config.data.tasks, sft_config.data.num_eval,
                                                            sft_config.data.task_seed, "validation")}
    tasks = config.recipe.tasks or sft_config.data.tasks
    examples = graded_tasks.make_examples(tasks, config.recipe.eval_prompts + len(seen),
                                          sft_config.data.task_seed + 7, "validation")
    return [e for e in examples if e["prompt"] not in seen][:config.recipe.eval_prompts]


def stage_report(policy, sft, examples, prompts, sft_scores, *, max_new_tokens: int, seed: int) -> dict:
    """oracle scores (greedy and sampled), win rate against SFT and KL to SFT of one policy."""
    tok = sft.tokenizer
    kw = dict(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
    greedy = evaluation.sample_responses(policy.params, policy.model_cfg, prompts, rng=jax.random.PRNGKey(seed),
                                         temperature=0.0, **kw)
    scores = evaluation.oracle_scores(examples, evaluation.decode(tok, greedy))
    sampled = evaluation.sample_responses(policy.params, policy.model_cfg, prompts,
                                          rng=jax.random.PRNGKey(seed + 1), temperature=1.0, **kw)
    kl = evaluation.kl_to_reference(policy.model_cfg, policy.params, sft.params, prompts, sampled,
                                    pad_id=tok.pad_id, eos_id=tok.eos_id, width=max_new_tokens)
    return {"oracle_score": float(scores.mean()),
            "oracle_score_sampled": float(evaluation.oracle_scores(examples, evaluation.decode(tok, sampled)).mean()),
            **_versus(scores, sft_scores, seed), "kl_to_sft": kl, "oracle_score_by_task": by_task(examples, scores)}, scores


def by_task(examples: list[dict], scores: np.ndarray) -> dict:
    """{task: mean oracle score of its prompts} for [n] examples and their [n] scores."""
    tasks = [e["task"] for e in examples]
    return {task: float(np.mean([s for t, s in zip(tasks, scores) if t == task])) for task in dict.fromkeys(tasks)}


def _versus(scores, sft_scores, seed) -> dict:
    versus = evaluation.win_rate(scores, sft_scores, seed=seed)
    return {"win_rate_vs_sft": versus["win_rate"], "win_rate_ci": versus["win_rate_ci"],
            "tie_rate": versus["tie_rate"]}


def best_of_n_report(sft, score_fn, examples, prompts, sft_scores, *, n: int, max_new_tokens: int, seed: int) -> dict:
    """Best-of-n against the reward model, on the SFT policy's samples at temperature 1."""
    tok = sft.tokenizer
    samples = evaluation.sample_responses(sft.params, sft.model_cfg, [p for p in prompts for _ in range(n)],
                                          max_new_tokens=max_new_tokens, rng=jax.random.PRNGKey(seed + 2),
                                          temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    groups = [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
    chosen = evaluation.best_of_n(score_fn, prompts, groups, pad_id=tok.pad_id)
    scores = evaluation.oracle_scores(examples, evaluation.decode(tok, [g[c] for g, c in zip(groups, chosen)]))
    return {"oracle_score": float(scores.mean()), "oracle_score_sampled": float(scores.mean()),
            **_versus(scores, sft_scores, seed), "kl_to_sft": evaluation.best_of_n_kl(n),
            "oracle_score_by_task": by_task(examples, scores)}


def make_report(config, workdir: str) -> dict:
    """Evaluates SFT, PPO, DPO and best-of-n on the report prompts; writes report.json and report.md."""
    sft = saved_model.load(os.path.join(workdir, "sft"))
    examples = report_prompts(config, sft.config)
    prompts = evaluation.encode_prompts(examples, sft.tokenizer, sft.config.template)
    width, seed = config.recipe.max_new_tokens, config.seed
    stages = {}
    greedy = evaluation.sample_responses(sft.params, sft.model_cfg, prompts, rng=jax.random.PRNGKey(seed),
                                         temperature=0.0, max_new_tokens=width, eos_id=sft.tokenizer.eos_id,
                                         pad_id=sft.tokenizer.pad_id)
    sft_scores = evaluation.oracle_scores(examples, evaluation.decode(sft.tokenizer, greedy))
    stages["sft"], _ = stage_report(sft, sft, examples, prompts, sft_scores, max_new_tokens=width, seed=seed)
    rm_dir = os.path.join(workdir, "reward")
    if os.path.isdir(rm_dir):
        stages["reward"] = {"rm_accuracy": reward_accuracy(rm_dir)}
        score_fn, _, _ = reward_task.load_reward_model(rm_dir)
        stages["best_of_n"] = best_of_n_report(sft, score_fn, examples, prompts, sft_scores, n=config.recipe.best_of_n,
                                               max_new_tokens=width, seed=seed)
    for stage in ("ppo", "dpo"):
        if os.path.isdir(os.path.join(workdir, stage, "best")):
            policy = saved_model.load(os.path.join(workdir, stage), "best")
            stages[stage], _ = stage_report(policy, sft, examples, prompts, sft_scores, max_new_tokens=width, seed=seed)
    report = {"stages": {name: {f: row.get(f) for f in REPORT_FIELDS} | {f: row[f] for f in EXTRA_FIELDS if f in row}
                         for name, row in stages.items()},
              "num_prompts": len(examples), "best_of_n": config.recipe.best_of_n}
    metrics_lib.write_json_atomic(os.path.join(workdir, "report.json"), report)
    write_markdown(os.path.join(workdir, "report.md"), report)
    return report


def reward_accuracy(rm_dir: str) -> float | None:
    """The reward model's best held-out comparison accuracy (its metrics.jsonl)."""
    values = [r["eval_accuracy"] for r in metrics_lib.read_jsonl(os.path.join(rm_dir, "metrics.jsonl"))
              if "eval_accuracy" in r]
    return max(values) if values else None


def write_markdown(path: str, report: dict) -> None:
    """A paper-style table of `report` (atomic)."""
    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, list):
            return f"[{value[0]:.3f}, {value[1]:.3f}]"
        return f"{value:.3f}"
    lines = [f"Held-out prompts: {report['num_prompts']}; best-of-n: n = {report['best_of_n']}.", "",
             "| stage | " + " | ".join(REPORT_FIELDS) + " |", "|---|" + "---:|" * len(REPORT_FIELDS)]
    lines += [f"| {name} | " + " | ".join(cell(row[f]) for f in REPORT_FIELDS) + " |"
              for name, row in report["stages"].items()]
    per_task = {name: row["oracle_score_by_task"] for name, row in report["stages"].items() if row.get("oracle_score_by_task")}
    if per_task:
        tasks = list(next(iter(per_task.values())))
        lines += ["", "Oracle score (greedy) by task:", "", "| stage | " + " | ".join(tasks) + " |",
                  "|---|" + "---:|" * len(tasks)]
        lines += [f"| {name} | " + " | ".join(cell(row.get(t)) for t in tasks) + " |" for name, row in per_task.items()]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def run(config, workdir: str) -> dict:
    """Runs the stages still to run, then writes the report; returns it."""
    run_stages(config, workdir)
    report = make_report(config, workdir)
    print(open(os.path.join(workdir, "report.md")).read())
    return report

