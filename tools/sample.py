"""Generate text from a trained workdir (pretraining, SFT, LoRA) with the KV-cache sampler.

python -m tools.sample --workdir DIR --prompt "def " --max_new_tokens 100 --temperature 0.8 \
    --top_k 40 --top_p 0.95 [--prompt "another prompt" ...] [--chat] [--checkpoint auto|best|latest]

--chat wraps each prompt in the run's chat template (config.template: user + prompt + assistant),
as SFT trained it; generation stops at EOS. Prompts of different lengths go in one batch.
"""

import argparse
import sys

import jax

from lm import sampling, saved_model
from lm.data import sft as sft_data
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
        encoded = [[tok.bos_id] + tok.encode(t) for t in prompts]
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
        shown = sft_data.format_prompt(model.config.template, prompt) if args.chat else prompt
        print(f"--- sample {i} ---\n{shown}{tok.decode([t for t in out if t != tok.eos_id])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
