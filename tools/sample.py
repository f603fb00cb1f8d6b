"""Generate text from a trained workdir with the KV-cache sampler.

python -m tools.sample --workdir DIR --prompt "def " --max_new_tokens 100 --temperature 0.8 \
    --top_k 40 --top_p 0.95 [--prompt "another prompt" ...] [--seed 0]
"""
import argparse
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm import checkpoint, sampling, sharding
from lm.data.tokenizer import load_tokenizer
from lm.errors import UserError
from lm.model import Transformer
from lm.tasks.pretrain import model_config


def load_model(workdir: str):
    """(params, model_cfg, tokenizer) of the newest checkpoint in `workdir`, on one device."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"--workdir {workdir}: no config.json (not a training workdir?)")
    with open(path) as f:
        saved = json.load(f)
    saved.pop("run", None)
    config = ml_collections.ConfigDict(saved)
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    model_cfg = model_config(config, tokenizer.vocab_size)
    model = Transformer(model_cfg)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    shardings = sharding.tree_shardings(boxed, mesh, sharding.axis_rules(config.axis_rules))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return checkpoint.restore_params(workdir, abstract), model_cfg, tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        params, model_cfg, tok = load_model(args.workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompts = args.prompt or [""]
    outs = sampling.generate({"params": params}, model_cfg, [[tok.bos_id] + tok.encode(t) for t in prompts],
                             max_new_tokens=args.max_new_tokens, rng=jax.random.PRNGKey(args.seed),
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             eos_id=tok.eos_id, pad_id=tok.pad_id)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        print(f"--- sample {i} ---\n{prompt}{tok.decode([t for t in out if t != tok.eos_id])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
