"""Masked-LM and next-sentence-prediction rows (Devlin et al. 2019, BERT) from documents of lines.

A document is a file of the corpus and its sentences are its non-blank lines, each tokenized on its
own (`LineCorpus`, cached under the data dir). A row is `[CLS] A [SEP] B [SEP]` then padding,
with [CLS] the tokenizer's BOS, [SEP] its EOS and [MASK] one id past its vocabulary
(`special_ids`). A holds whole consecutive lines of a document (up to half the row); B, by the
NSP label:
  binary:    0 the lines that follow A; 1 lines of another document.
  three_way: 0 the lines that follow A; 1 other lines of A's document (never A's next line nor A
             itself); 2 lines of another document.
  none:      `[CLS] lines [SEP]`: consecutive lines of one document over the whole row (label 0, unused).
Labels are drawn uniformly. BERT's masking rule (`mask_tokens`) then picks 15% of the non-special
tokens of a row; of those 80% become [MASK], 10% a random ordinary token and 10% stay, and the
loss is taken at the picked positions only (`mlm_positions`, `mlm_targets`, `mlm_weights`).

Every row of step t is a pure function of (seed, t, row): resume is exact and no epoch is stored.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from lm import sharding
from lm.data import pipeline
from lm.errors import DataError

NSP_KINDS = ("none", "binary", "three_way")
NSP_CLASSES = {"none": 1, "binary": 2, "three_way": 3}
MASK_RATE, MASK_TOKEN, RANDOM_TOKEN = 0.15, 0.8, 0.1  # the rest of the picked tokens stay
_EVAL_STREAM = 1  # eval rows draw from (seed, _EVAL_STREAM, batch, row); train rows from (seed, step, row)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """[CLS] (the tokenizer's BOS), [SEP] (its EOS), padding, [MASK] (= the tokenizer's vocabulary
    size, so the model's vocabulary is one larger) and the range [first_regular, mask) of ordinary
    tokens a masked position may be replaced by."""

    cls: int
    sep: int
    pad: int
    mask: int
    first_regular: int

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: the tokenizer's and [MASK]."""
        return self.mask + 1


def special_ids(tokenizer) -> SpecialIds:
    """The special ids of an encoder on `tokenizer` (see `SpecialIds`)."""
    first = max(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) + 1
    return SpecialIds(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size, first)


@dataclasses.dataclass
class LineCorpus:
    """Documents of tokenized lines: line i is ids[line_start[i]:line_start[i + 1]] and document d
    holds lines doc_start[d] .. doc_start[d + 1] - 1."""

    ids: np.ndarray  # [tokens] int32
    line_start: np.ndarray  # [lines + 1] int64
    doc_start: np.ndarray  # [docs + 1] int64

    @property
    def num_docs(self) -> int:
        return len(self.doc_start) - 1

    def num_lines(self, doc: int) -> int:
        return int(self.doc_start[doc + 1] - self.doc_start[doc])

    def lines(self, doc: int, first: int, end: int) -> list[np.ndarray]:
        """Lines first .. end - 1 of document `doc`, each [len] int32."""
        base = int(self.doc_start[doc])
        return [
            self.ids[self.line_start[base + i] : self.line_start[base + i + 1]] for i in range(first, end)
        ]


def line_corpus(texts, tokenizer, min_lines: int = 4) -> LineCorpus:
    """Documents -> a LineCorpus of their non-blank lines (trailing space dropped, indentation
    kept); documents with fewer than `min_lines` lines are left out."""
    ids, line_start, doc_start = [], [0], [0]
    for text in texts:
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        if len(lines) < min_lines:
            continue
        for piece in tokenizer.encode_batch(lines):
            ids.extend(piece)
            line_start.append(len(ids))
        doc_start.append(len(line_start) - 1)
    return LineCorpus(
        np.asarray(ids, np.int32), np.asarray(line_start, np.int64), np.asarray(doc_start, np.int64)
    )


def prepare_lines(data_cfg, tokenizer_cfg):
    """(tokenizer, train LineCorpus, eval LineCorpus, info) of the corpus `data_cfg` names, with the
    tokenizer pretraining would use (`pipeline.get_tokenizer`); the lines are cached under the data dir."""
    data_dir = pipeline.resolve_data_dir(data_cfg.data_dir)
    os.makedirs(data_dir, exist_ok=True)
    with pipeline.file_lock(os.path.join(data_dir, ".prepare.lock")):
        with pipeline.first_run_note(data_cfg.source, data_dir) as begin:
            corpus = pipeline.open_corpus(data_cfg, data_dir, begin)
            tokenizer, path = pipeline.get_tokenizer(tokenizer_cfg, corpus, data_dir, begin)
            cache = os.path.join(data_dir, "lines", corpus.key, tokenizer.identity)
            splits = {}
            for name, split in (("train", "train"), ("eval", corpus.eval_split)):
                file = os.path.join(cache, f"{split}.npz")
                if not os.path.exists(file):
                    begin()
                    lines = line_corpus(corpus.texts(split), tokenizer)
                    os.makedirs(cache, exist_ok=True)
                    np.savez(file + ".tmp.npz", **dataclasses.asdict(lines))
                    os.replace(file + ".tmp.npz", file)
                with np.load(file) as f:
                    splits[name] = LineCorpus(f["ids"], f["line_start"], f["doc_start"])
    for name, lines in splits.items():
        if lines.num_docs < 2:
            raise DataError(f"config.data.source={data_cfg.source!r}: the {name} split has under 2 documents")
    info = {
        "source": data_cfg.source,
        "corpus": corpus.key,
        "tokenizer": {"path": path, "vocab_size": tokenizer.vocab_size, "identity": tokenizer.identity},
        **{
            f"{name}_{what}": int(value)
            for name, lines in splits.items()
            for what, value in (("docs", lines.num_docs), ("lines", len(lines.line_start) - 1))
        },
    }
    return tokenizer, splits["train"], splits["eval"], info


def _take_lines(lines: list[np.ndarray], budget: int) -> list[int]:
    """Whole lines from the front while they fit `budget` tokens (the first one cut to fit)."""
    out: list[int] = []
    for line in lines:
        if out and len(out) + len(line) > budget:
            break
        out.extend(line[: budget - len(out)].tolist())
    return out


def nsp_pair(corpus: LineCorpus, rng: np.random.Generator, kind: str, budget: int) -> dict:
    """One (A, B) pair and its label (see the module docstring): A of at most `budget` tokens
    (kind 'none') or half of it, B of what A leaves.

    Returns {'a', 'b': lists of ids, 'label': int, 'a_lines', 'b_lines': (doc, first, end) line
    ranges they were taken from (end exclusive; the last line may be cut short)}.
    """
    label = int(rng.integers(NSP_CLASSES[kind]))
    doc = int(rng.integers(corpus.num_docs))
    n = corpus.num_lines(doc)
    first = int(rng.integers(n - 1))  # A leaves at least its next line in the document
    if kind == "none":
        lines = corpus.lines(doc, first, n)
        a = _take_lines(lines, budget)
        end = first + _lines_used(lines, len(a))
        return {"a": a, "b": [], "label": 0, "a_lines": (doc, first, end), "b_lines": (doc, end, end)}
    lengths = np.cumsum([len(line) for line in corpus.lines(doc, first, n - 1)])
    end = first + max(1, int(np.searchsorted(lengths, budget // 2, side="right")))
    end = min(end, max(first + 1, n - 2))  # three_way's 1 needs a line away from A and its next
    a = _take_lines(corpus.lines(doc, first, end), budget // 2)
    if label == 0:
        b_doc, b_first = doc, end
    elif label == NSP_CLASSES[kind] - 1:  # another document
        b_doc = int((doc + 1 + rng.integers(corpus.num_docs - 1)) % corpus.num_docs)
        b_first = int(rng.integers(corpus.num_lines(b_doc)))
    else:  # three_way's 1: the same document, away from A and A's next line
        choices = list(range(0, first)) + list(range(end + 1, n))
        b_doc, b_first = doc, int(choices[rng.integers(len(choices))])
    b_lines = corpus.lines(b_doc, b_first, corpus.num_lines(b_doc))
    b = _take_lines(b_lines, budget - len(a))
    b_end = b_first + _lines_used(b_lines, len(b))
    return {"a": a, "b": b, "label": label, "a_lines": (doc, first, end), "b_lines": (b_doc, b_first, b_end)}


def _lines_used(lines: list[np.ndarray], num_tokens: int) -> int:
    """How many of `lines` the first `num_tokens` ids taken from them touch."""
    used = total = 0
    while used < len(lines) and total < num_tokens:
        total += len(lines[used])
        used += 1
    return used


def mask_tokens(tokens: np.ndarray, special: SpecialIds, rng: np.random.Generator, max_predictions: int):
    """BERT's masking rule on one row.

    Args:
      tokens: [seq] int32 ids; [CLS], [SEP] and padding are never picked.
    Returns:
      (inputs [seq] int32 with the picked tokens replaced, positions [max_predictions] int32 of the
      picked tokens (sorted, 0 after them), targets [max_predictions] int32 (their original ids),
      weights [max_predictions] float32 (1 for each picked position, 0 after)). max(1,
      round(15%)) of the row's ordinary tokens are picked, at most max_predictions.
    """
    candidates = np.flatnonzero(
        (tokens != special.cls) & (tokens != special.sep) & (tokens != special.pad) & (tokens != special.mask)
    )
    count = min(max_predictions, max(1, round(MASK_RATE * len(candidates)))) if len(candidates) else 0
    picked = np.sort(rng.choice(candidates, count, replace=False)) if count else np.zeros([0], np.int64)
    u = rng.random(count)
    inputs = tokens.copy()
    inputs[picked[u < MASK_TOKEN]] = special.mask
    swap = picked[(u >= MASK_TOKEN) & (u < MASK_TOKEN + RANDOM_TOKEN)]
    inputs[swap] = rng.integers(special.first_regular, special.mask, len(swap))
    positions = np.zeros([max_predictions], np.int32)
    targets = np.zeros([max_predictions], np.int32)
    weights = np.zeros([max_predictions], np.float32)
    positions[:count], targets[:count], weights[:count] = picked, tokens[picked], 1.0
    return inputs, positions, targets, weights


def max_predictions(seq_len: int) -> int:
    """The most positions a row of `seq_len` tokens can have picked: 15% of them, rounded up."""
    return max(1, math.ceil(MASK_RATE * seq_len))


def mlm_row(
    corpus: LineCorpus, rng: np.random.Generator, kind: str, seq_len: int, special: SpecialIds
) -> dict:
    """One row: {'inputs', 'positions', 'segment_ids': [seq] int32 (segment 1, padding 0),
    'mlm_positions', 'mlm_targets': [max_predictions] int32, 'mlm_weights': [max_predictions]
    float32, 'nsp_labels': [1] int32} (every array of a batch is sharded over its first axis)."""
    pair = nsp_pair(corpus, rng, kind, seq_len - (2 if kind == "none" else 3))
    ids = [special.cls] + pair["a"] + [special.sep] + (pair["b"] + [special.sep] if kind != "none" else [])
    tokens = np.full([seq_len], special.pad, np.int32)
    tokens[: len(ids)] = ids
    inputs, positions, targets, weights = mask_tokens(tokens, special, rng, max_predictions(seq_len))
    return {
        "inputs": inputs,
        "positions": np.arange(seq_len, dtype=np.int32),
        "segment_ids": (tokens != special.pad).astype(np.int32),
        "mlm_positions": positions,
        "mlm_targets": targets,
        "mlm_weights": weights,
        "nsp_labels": np.asarray([pair["label"]], np.int32),
    }


def mlm_batch(
    corpus: LineCorpus, rows, seed_parts: tuple, kind: str, seq_len: int, special: SpecialIds
) -> dict:
    """The given `rows` of a batch, each drawn from np.random.default_rng((*seed_parts, row)):
    dict of [len(rows), ...] arrays as `mlm_row`'s."""
    made = [mlm_row(corpus, np.random.default_rng((*seed_parts, r)), kind, seq_len, special) for r in rows]
    return {k: np.stack([m[k] for m in made]) for k in made[0]}


def train_batch(corpus, step: int, batch_size: int, seed: int, kind: str, seq_len: int, special) -> dict:
    """This process' rows of the global train batch of `step` (a pure function of seed and step)."""
    rows = range(batch_size)[sharding.process_slice(batch_size)]
    return mlm_batch(corpus, rows, (seed, 0, step), kind, seq_len, special)


def eval_batch(corpus, index: int, batch_size: int, seed: int, kind: str, seq_len: int, special) -> dict:
    """This process' rows of held-out batch `index` (fixed for a seed)."""
    rows = range(batch_size)[sharding.process_slice(batch_size)]
    return mlm_batch(corpus, rows, (seed, _EVAL_STREAM, index), kind, seq_len, special)
