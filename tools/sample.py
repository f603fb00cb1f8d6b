"""Generate text from a trained workdir (pretraining, SFT, LoRA) with the KV-cache sampler.

python -m tools.sample --workdir DIR --prompt "def " --max_new_tokens 100 --temperature 0.8 \
    --top_k 40 --top_p 0.95 [--prompt "another prompt" ...] [--chat] [--checkpoint auto|best|latest]

--chat wraps each prompt in the run's chat template (config.template: user + prompt + assistant),
as SFT trained it; generation stops at EOS. Prompts of different lengths go in one batch. A prompt
starts with BOS as the tokenizer encodes it (`bos_prefix`: ours always; an imported Hugging Face
tokenizer when its post-processor adds one, as `transformers`' tok(prompt) does; an empty prompt
is [BOS] either way).
--json prints one JSON object per prompt per line instead: {"prompt", "completion", "tokens"}
(the generated ids, EOS included); with --temperature 0 (greedy) they are what the model's argmax
gives step by step.
"""

import argparse
import json
import sys

import jax

from lm import sampling, saved_model
from lm.data import sft as sft_data
from lm.data import tokenizer as tokenizer_lib
from lm.errors import UserError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the run's chat template")
    p.add_argument(
        "--checkpoint",
        default="auto",
        choices=saved_model.CHOICES,
        help="best (SFT's best eval), latest, or auto: best when there is one",
    )
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=40, help="0: off")
    p.add_argument("--top_p", type=float, default=0.95, help="1.0: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    args = p.parse_args(argv)
    try:
        model = saved_model.load(args.workdir, args.checkpoint)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok, prompts = model.tokenizer, args.prompt or [""]
    if args.chat:
        encoded = [sft_data.encode_prompt(tok, model.config.template, t) for t in prompts]
    else:
        encoded = [tokenizer_lib.bos_prefix(tok) + tok.encode(t) or [tok.bos_id] for t in prompts]
    outs = sampling.generate(
        {"params": model.params},
        model.model_cfg,
        encoded,
        max_new_tokens=args.max_new_tokens,
        rng=jax.random.PRNGKey(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        completion = tok.decode([t for t in out if t != tok.eos_id])
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion, "tokens": [int(t) for t in out]}))
            continue
        shown = sft_data.format_prompt(model.config.template, prompt, tok) if args.chat else prompt
        print(f"--- sample {i} ---\n{shown}{completion}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
