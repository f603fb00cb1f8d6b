"""What a language model must beat on a config's held-out split, in the units our metrics use.

python -m tools.baselines --config configs/pretrain/tiny.py[:arg]

Prints the unigram entropy and an (optimistic) bigram model's cross-entropy in nats/token, and
gzip -9 and xz -9 on the concatenated held-out bytes in bits/byte (compare with eval_bits_per_byte).
"""
import argparse
import gzip
import json
import lzma
import sys

import numpy as np

from lm.data import pipeline
from tools.bench import load_config


def heldout_bytes(data: pipeline.LMData) -> bytes:
    """The held-out documents' text, concatenated, as UTF-8 bytes (tokenization round-trips exactly)."""
    tokens = np.asarray(data.eval.tokens)
    tok = data.tokenizer
    return tok.decode([int(t) for t in tokens if t not in (tok.bos_id, tok.eos_id, tok.pad_id)]).encode("utf-8")


def baselines(config) -> dict:
    """unigram/bigram nats per token and gzip/xz bits per byte for the config's held-out split."""
    data = pipeline.prepare_data(config.data, config.tokenizer, config.train.seq_len)
    vocab = data.tokenizer.vocab_size
    raw = heldout_bytes(data)
    return {
        "unigram_entropy": pipeline.unigram_entropy(data.eval, vocab),
        "bigram_cross_entropy": pipeline.bigram_cross_entropy(data.train, data.eval, vocab),
        "heldout_bytes": len(raw),
        "bytes_per_token": data.info["bytes_per_token"],
        "gzip9_bits_per_byte": 8 * len(gzip.compress(raw, compresslevel=9)) / len(raw),
        "xz9_bits_per_byte": 8 * len(lzma.compress(raw, preset=9)) / len(raw),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config file[:arg]")
    args = p.parse_args(argv)
    print(json.dumps(baselines(load_config(args.config)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
