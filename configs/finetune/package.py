"""The 'package' task of the downstream suite (lm.data.downstream), set up as configs/finetune/tagging.py:

  python -m experiments.run --config configs/finetune/package.py --workdir runs/package \\
      --config.init_from=runs/mlm_tiny
"""

from configs.finetune import tagging


def get_config(arg=None):
    return tagging.get_config(arg, task="package")
