"""What a model must beat on a config's held-out split, in the units our metrics use.

python -m tools.baselines --config configs/pretrain/tiny.py[:arg]
python -m tools.baselines --config configs/sft/tasks_tiny.py

Pretraining: the unigram entropy and an (optimistic) bigram model's cross-entropy in nats/token,
and gzip -9 and xz -9 on the concatenated held-out bytes in bits/byte (compare with
eval_bits_per_byte). SFT on graded tasks: the grader scores of trivial policies (an empty answer,
a copy of the prompt) and of the ideal answers on the held-out prompts the run evaluates on
(compare with eval_grader_score and eval_exact_match).
"""

import argparse
import gzip
import json
import lzma
import sys

import numpy as np

from lm.data import graded_tasks, pipeline
from tools.bench import load_config


def heldout_bytes(data: pipeline.LMData) -> bytes:
    """The held-out documents' text, concatenated, as UTF-8 bytes (tokenization round-trips exactly)."""
    tokens = np.asarray(data.eval.tokens)
    tok = data.tokenizer
    return tok.decode([int(t) for t in tokens if t not in (tok.bos_id, tok.eos_id, tok.pad_id)]).encode(
        "utf-8"
    )


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


def graded_baselines(config) -> dict:
    """Mean grader score and exact match of trivial answers on the run's held-out graded prompts."""
    examples = graded_tasks.make_examples(
        config.data.tasks, config.data.num_eval, config.data.task_seed, "validation"
    )[: config.sft.eval_prompts]
    policies = {
        "empty": lambda ex: "",
        "copy_prompt": lambda ex: ex["prompt"],
        "ideal": lambda ex: ex["response"],
    }
    out = {}
    for name, answer in policies.items():
        grades = graded_tasks.grade_batch(examples, [answer(ex) for ex in examples])
        out.update({f"{name}_{k}": v for k, v in grades.items()})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="config file[:arg]")
    args = p.parse_args(argv)
    config = load_config(args.config)
    graded = config.task != "pretrain" and config.data.source == "graded_tasks"
    print(json.dumps(graded_baselines(config) if graded else baselines(config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
