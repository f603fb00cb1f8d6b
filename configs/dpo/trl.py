"""DPO of an SFT policy directly on TRL-style preference JSONL ({"prompt", "chosen", "rejected"}
per line), no reward-model workdir needed:

  python -m experiments.run --config configs/dpo/trl.py --workdir runs/dpo_trl \
      --config.init_from=runs/sft_trl --config.data.files=preferences.jsonl

The pairs are those a reward model would build from the same files (configs/reward/trl.py, same
data.eval_fraction, skip_bad_records and seq_len): train on the 'train' split, eval_accuracy on the
selection half of the 'validation' split, which best/ keeps the best policy by. The settings are
the HH DPO's (configs/dpo/hh.py).
Bad lines and examples longer than config.train.seq_len stop the run with one line naming them;
--config.data.skip_bad_records=True skips and counts them instead (the same flag in every stage:
it is part of the split).
"""

from configs.dpo import hh


def get_config(arg=None):
    c = hh.get_config(arg)
    c.data.source = "trl"
    c.data.skip_bad_records = False  # a malformed line stops the run (see above)
    return c
