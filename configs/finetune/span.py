"""The 'span' task of the downstream suite (lm.data.downstream), set up as configs/finetune/tagging.py:

  python -m experiments.run --config configs/finetune/span.py --workdir runs/span \\
      --config.init_from=runs/mlm_tiny
"""

from configs.finetune import tagging


def get_config(arg=None):
    return tagging.get_config(arg, task="span")
