"""A reward model on TRL-style preference JSONL, {"prompt": str, "chosen": str, "rejected": str}
per line (or TRL's conversational form: prompt a message list, chosen and rejected each a list of
one assistant message), from an SFT run:

  python -m experiments.run --config configs/reward/trl.py --workdir runs/rm_trl \
      --config.init_from=runs/sft_trl --config.data.files=preferences.jsonl

K = 2 as for HH (configs/reward/hh.py): chosen rank 0, rejected rank 1; the builder's 'validation'
split (prompts picked by hash) gives the held-out pairs; the normalisation runs over the chosen
responses.
Bad lines and examples longer than config.train.seq_len stop the run with one line naming them;
--config.data.skip_bad_records=True skips and counts them instead (the same flag in every stage:
it is part of the split).
"""

from configs.reward import hh


def get_config(arg=None):
    c = hh.get_config(arg)
    c.data.source = "trl"
    c.data.skip_bad_records = False  # a malformed line stops the run (see above)
    return c
