"""The InstructGPT recipe on Anthropic HH dialogues, in one command:

  python -m experiments.run --config configs/recipe/instructgpt_hh.py --workdir runs/recipe_hh \
      --config.recipe.data_files=hh_rlhf/train.jsonl

pretrain (configs/pretrain/tiny.py) -> SFT on the chosen responses (configs/sft/hh.py) -> reward
model on the chosen/rejected pairs (configs/reward/hh.py) -> PPO on HH prompts (configs/ppo/hh.py),
with DPO on the reward model's pairs (configs/dpo/hh.py) beside PPO and best-of-n at report time;
each stage in DIR/<stage>/, skipped once completed. recipe.data_files (a glob or comma-separated
.jsonl/.json files of {"chosen", "rejected"} transcripts) goes to the SFT, reward and PPO stages
as config.data.files. No oracle: DIR/report.json and report.md have the graded recipe's layout with
the oracle fields null, and score each policy with the reward model on held-out ('validation')
HH prompts (rm_score, rm_score_sampled), beside kl_to_sft and the reward model's rm_accuracy.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, smoke=False)
    c = common.recipe_config()
    c.recipe.source = "hh"
    c.recipe.data_files = ""  # required: the HH file(s)
    suffix = ":smoke" if a.smoke else ""
    c.recipe.pretrain = "configs/pretrain/tiny.py" + suffix  # '' skips a stage
    c.recipe.sft = "configs/sft/hh.py" + suffix
    c.recipe.reward = "configs/reward/hh.py" + suffix
    c.recipe.ppo = "configs/ppo/hh.py" + suffix
    c.recipe.dpo = "configs/dpo/hh.py" + suffix
    c.recipe.eval_prompts = 40 if a.smoke else 500  # held-out prompts of the report, at most
    c.recipe.best_of_n = 4 if a.smoke else 16
    c.recipe.max_new_tokens = 8 if a.smoke else 32
    return c
