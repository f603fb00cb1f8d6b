"""SFT on TRL-style JSONL: {"messages": [{"role", "content"}, ...]} conversations (or TRL's
{"prompt", "completion"} pairs), loss on the final assistant turn:

  python -m experiments.run --config configs/sft/trl.py --workdir runs/sft_trl \
      --config.init_from=runs/tiny --config.data.files=sft.jsonl

Each conversation is one example: the turns before its final assistant turn are the prompt
(rendered by the tokenizer's chat template when it has one, else by config.template: "User: ...
\nAssistant: ..."), that turn's content the response; the loss is on that response and its EOS.
No grader: the best checkpoint is the one with the lowest held-out loss (the builder's
'validation' split, prompts picked by hash). The sizes are the HH SFT's (configs/sft/hh.py).
Bad lines and examples longer than config.train.seq_len stop the run with one line naming them;
--config.data.skip_bad_records=True skips and counts them instead (the same flag in every stage:
it is part of the split).
"""

from configs import common
from configs.sft import hh


def get_config(arg=None):
    c = hh.get_config(arg)
    c.data.source = "trl"
    c.data.skip_bad_records = False  # a malformed line stops the run (see above)
    c.template = common.sft_config().template  # "User: " / "\nAssistant: ", not HH's own format
    return c
