"""End-to-end training: the tiny config learns the embedded corpus; a user's book trains too."""

import json
import os
import subprocess
import sys

import pytest

from configs.pretrain import tiny
from lm.data import pipeline

BOOK = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt")


def train(workdir, *overrides):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/pretrain/tiny.py",
            f"--workdir={workdir}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def book(tmp_path) -> str:
    """A book-sized .txt: Tiny Shakespeare when the shared data is here, else standard-library prose."""
    if os.path.exists(BOOK):
        return BOOK
    import pydoc_data.topics as topics

    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(topics.topics.values()))
    return str(path)


# About 3 minutes: a whole book through text_files (../shared/checks/foundation runs it too).
@pytest.mark.slow
def test_text_files_book_trains(tmp_path):
    """Tiny Shakespeare through text_files with the tiny config, 80 steps.

    Measured: 8.36 -> 7.50 nats/token held out (150 steps, the foundation check: 8.36 -> 7.36).
    """
    records = train(
        tmp_path / "w",
        "--config.data.source=text_files",
        f"--config.data.files={book(tmp_path)}",
        "--config.train.steps=80",
        "--config.train.eval_every=0",
    )
    assert records[0]["step"] == 1
    assert records[-1]["eval_loss"] < records[0]["loss"] - 0.75
    with open(tmp_path / "w" / "samples.txt") as f:
        assert f.read().count("--- sample") == 3


@pytest.mark.slow
def test_tiny_config_learns_well_below_unigram(tmp_path):
    """The README's main job with its defaults (about 5 minutes on 2 cores).

    Held-out split, vocab 4096 (3.82 bytes/token): unigram entropy 7.09 nats/token; an optimistic
    bigram (counted on the 7.7M train tokens, interpolation weight chosen on the held-out split)
    5.34. The 5-minute run reached 6.35 (2.40 bits/byte): well below the unigram, not yet below
    the bigram, which needs a longer run than this budget allows on 2 cores.
    """
    records = train(tmp_path / "w")
    config = tiny.get_config()
    data = pipeline.prepare_data(config.data, config.tokenizer, config.train.seq_len)
    unigram = pipeline.unigram_entropy(data.eval, data.tokenizer.vocab_size)
    assert records[-1]["eval_loss"] < unigram - 0.5
