"""A downstream suite with exact labels, computed by the standard library from held-out code.

The documents are the corpus' held-out split (for the stdlib corpus: packages no pretraining run
trained on); each example goes to the fine-tuning train or eval split by a hash of its file and
index. Every row is `[CLS] text [SEP]` (or `[CLS] A [SEP] B [SEP]`) then padding, with [CLS] the
tokenizer's BOS and [SEP] its EOS. The tasks:
  tagging   the Python `tokenize` category (TAGS) of each subword piece of a window of whole lines:
            the category of the piece's first non-space character (characters no token covers,
            such as a line continuation, are 'other'); pieces of whitespace alone are not scored.
            Every piece is labelled, not only a word's first.
  package   a window's top-level package (`email/mime/text.py` -> `email`), among the packages
            with windows in both splits.
  pair      whether line B is the line right after line A (blank lines skipped), or another line
            of the same file: balanced.
  span      the source of the value of a function's last `return` statement (`ast`), as start and
            end columns of the function's rows.
Trivial baselines: the train split's majority label (tagging, package, pair); the first return's
value up to the end of its line (span: copy-first-span).
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import io
import keyword
import tokenize

import numpy as np

from lm.errors import DataError

TASKS = ("tagging", "package", "pair", "span")
HEAD = {"tagging": "tag", "package": "classify", "pair": "classify", "span": "span"}
TAGS = ("keyword", "name", "operator", "number", "string", "comment", "other")
IGNORE = -1  # a tagging label that is not scored
_TOKEN_TAGS = {
    tokenize.OP: "operator",
    tokenize.NUMBER: "number",
    tokenize.STRING: "string",
    tokenize.COMMENT: "comment",
}


@dataclasses.dataclass
class Split:
    """Examples as arrays: tokens, segment_ids [n, seq] int32; labels [n, seq] (tagging, IGNORE
    where not scored), [n, 1] (package, pair) or [n, 2] (span: start, end columns) int32."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    labels: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.tokens)

    def take(self, ids) -> dict:
        """{'tokens', 'segment_ids', 'labels'} of rows `ids`."""
        return {"tokens": self.tokens[ids], "segment_ids": self.segment_ids[ids], "labels": self.labels[ids]}


@dataclasses.dataclass
class Suite:
    """One downstream task: both splits, its label names, and its trivial baseline on eval (the
    majority label; for span the copy-first-span columns [n_eval, 2])."""

    train: Split
    eval: Split
    label_names: tuple
    majority: int
    baseline_spans: np.ndarray | None = None


def char_tags(source: str) -> np.ndarray:
    """[len(source)] int8: the TAGS index of the `tokenize` token covering each character ('other'
    where none does; whitespace is 'other' too, and never scored). Raises SyntaxError or
    tokenize.TokenError on code that does not tokenize."""
    out = np.full([len(source)], TAGS.index("other"), np.int8)
    starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            tag = "keyword" if keyword.iskeyword(tok.string) else "name"
        elif tok.type in _TOKEN_TAGS:
            tag = _TOKEN_TAGS[tok.type]
        else:
            continue
        (srow, scol), (erow, ecol) = tok.start, tok.end
        out[starts[srow - 1] + scol : starts[erow - 1] + ecol] = TAGS.index(tag)
    return out


def piece_spans(text: str, ids: list[int], token_bytes: np.ndarray) -> list[tuple[int, int]] | None:
    """The character range [start, end) each piece of `ids` (an encoding of `text`) stands for,
    from the pieces' byte lengths; None when they do not add up to the text. A character split
    over byte pieces belongs to each of them."""
    data = text.encode("utf-8")
    lengths = token_bytes[np.asarray(ids, np.int64)]
    if int(lengths.sum()) != len(data):
        return None
    char_of_byte = np.repeat(np.arange(len(text)), [len(c.encode("utf-8")) for c in text])
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [(int(char_of_byte[s]), int(char_of_byte[e - 1]) + 1) for s, e in zip(starts, ends)]


def piece_tags(text: str, spans: list[tuple[int, int]], tags: np.ndarray) -> list[int]:
    """Each piece's tag: that of its first non-space character; IGNORE for whitespace alone."""
    out = []
    for start, end in spans:
        first = next((i for i in range(start, end) if not text[i].isspace()), None)
        out.append(IGNORE if first is None else int(tags[first]))
    return out


def _in_eval(path: str, index: int, eval_fraction: float) -> bool:
    digest = hashlib.sha256(f"{path}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def _windows(lines: list[str], line_lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Runs [first, end) of whole lines of about `budget` tokens (a longer line alone)."""
    out, first, total = [], 0, 0
    for i, n in enumerate(line_lengths):
        if i > first and total + n > budget:
            out.append((first, i))
            first, total = i, 0
        total += n
    if first < len(lines):
        out.append((first, len(lines)))
    return out


def _row(pieces: list[list[int]], seq_len: int, cls: int, sep: int, pad: int):
    """[CLS] p0 [SEP] (p1 [SEP]) padded: (tokens [seq], segment_ids [seq], column of each part's
    first piece)."""
    ids, starts = [cls], []
    for p in pieces:
        starts.append(len(ids))
        ids += p + [sep]
    tokens = np.full([seq_len], pad, np.int32)
    tokens[: len(ids)] = ids[:seq_len]
    return tokens, (np.arange(seq_len) < len(ids)).astype(np.int32), starts


def build_examples(task: str, docs, tokenizer, seq_len: int, seed: int = 0) -> list[dict]:
    """Examples of `task` from `docs` ((path, source) pairs): dicts with 'tokens', 'segment_ids'
    [seq] int32, 'label' (an int, a tag list [seq] or a (start, end) pair), 'path', 'index' and,
    for span, 'baseline' (start, end)."""
    token_bytes = tokenizer.token_bytes()
    cls, sep, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    rng = np.random.default_rng(seed)
    out = []
    for path, source in docs:
        try:
            tags = char_tags(source) if task == "tagging" else None
            tree = ast.parse(source) if task == "span" else None
        except (SyntaxError, tokenize.TokenError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        if task in ("tagging", "package"):
            line_starts = np.cumsum([0] + [len(line) for line in lines])
            lengths = [len(ids) for ids in tokenizer.encode_batch(lines)] if lines else []
            for index, (first, end) in enumerate(_windows(lines, lengths, seq_len - 2)):
                text = "".join(lines[first:end])
                if not text.strip():
                    continue
                ids = tokenizer.encode(text)[: seq_len - 2]
                tokens, segments, _ = _row([ids], seq_len, cls, sep, pad)
                example = {"tokens": tokens, "segment_ids": segments, "path": path, "index": index}
                if task == "package":
                    out.append({**example, "label": path.split("/")[0].removesuffix(".py")})
                    continue
                spans = piece_spans(text, ids, token_bytes) if len(ids) < seq_len - 2 else None
                if spans is None:  # cut short, or pieces that are not the text's bytes
                    continue
                offset = int(line_starts[first])
                labels = np.full([seq_len], IGNORE, np.int32)
                labels[1 : 1 + len(ids)] = piece_tags(text, spans, tags[offset : offset + len(text)])
                out.append({**example, "label": labels})
        elif task == "pair":
            kept = [line.rstrip("\n") for line in lines if line.strip()]
            if len(kept) < 3:
                continue
            encoded = tokenizer.encode_batch(kept)
            half = (seq_len - 3) // 2
            for i in range(len(kept) - 1):
                label = int(rng.integers(2))
                j = i + 1 if label else int(rng.choice([k for k in range(len(kept)) if k not in (i, i + 1)]))
                tokens, segments, _ = _row([encoded[i][:half], encoded[j][:half]], seq_len, cls, sep, pad)
                out.append(
                    {"tokens": tokens, "segment_ids": segments, "label": label, "path": path, "index": i}
                )
        elif task == "span":
            out += _span_examples(path, source, tree, tokenizer, token_bytes, seq_len, (cls, sep, pad))
        else:
            raise ValueError(f"task={task!r} must be one of {TASKS}")
    return out


def _span_examples(path, source, tree, tokenizer, token_bytes, seq_len, special) -> list[dict]:
    """Functions of `tree` with a `return <value>`: the last return's value is the answer; the
    first one's line, from its value on, is the copy-first-span baseline."""
    out = []
    line_starts = np.cumsum([0] + [len(line) for line in source.splitlines(keepends=True)])

    def char(row: int, col: int) -> int:  # ast's columns count UTF-8 bytes: equal to characters in ASCII
        return int(line_starts[row - 1]) + col

    for index, node in enumerate(
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ):
        returns = [n for n in ast.walk(node) if isinstance(n, ast.Return) and n.value is not None]
        if not returns or not source.isascii():  # byte columns equal character columns in ASCII
            continue
        returns.sort(key=lambda n: (n.lineno, n.col_offset))
        start = char(node.lineno, 0)
        text = source[start : char(node.end_lineno, node.end_col_offset)]
        last, first = returns[-1].value, returns[0].value
        answer = (
            char(last.lineno, last.col_offset) - start,
            char(last.end_lineno, last.end_col_offset) - start,
        )
        first_start = char(first.lineno, first.col_offset) - start
        line_end = text.find("\n", first_start)
        baseline = (first_start, len(text) if line_end < 0 else line_end)
        ids = tokenizer.encode(text)
        spans = piece_spans(text, ids, token_bytes)
        if spans is None or len(ids) > seq_len - 2:
            continue
        columns = [_columns(spans, a, b) for a, b in (answer, baseline)]
        if columns[0] is None:
            continue
        tokens, segments, _ = _row([ids], seq_len, *special)
        out.append(
            {
                "tokens": tokens,
                "segment_ids": segments,
                "label": columns[0],
                "baseline": columns[1] or (1, 1),
                "path": path,
                "index": index,
            }
        )
    return out


def _columns(spans, start: int, end: int):
    """(first, last) row columns of the pieces covering characters [start, end) (after [CLS]), or
    None when no piece does."""
    covering = [i for i, (s, e) in enumerate(spans) if s < end and e > start]
    return (covering[0] + 1, covering[-1] + 1) if covering else None


def build_suite(
    task: str, docs, tokenizer, seq_len: int, eval_fraction: float, max_train: int, max_eval: int
) -> Suite:
    """The task's two splits (by a hash of each example's file and index; at most max_train and
    max_eval examples, a seeded sample) and its baseline. Raises DataError when a split is empty."""
    examples = build_examples(task, docs, tokenizer, seq_len)
    held = [_in_eval(e["path"], e["index"], eval_fraction) for e in examples]
    parts = {
        "train": [e for e, h in zip(examples, held) if not h],
        "eval": [e for e, h in zip(examples, held) if h],
    }
    names: tuple = TAGS if task == "tagging" else ("different", "next") if task == "pair" else ()
    if task == "package":
        names = tuple(sorted({e["label"] for e in parts["train"]} & {e["label"] for e in parts["eval"]}))
        parts = {k: [e for e in v if e["label"] in names] for k, v in parts.items()}
    rng = np.random.default_rng(0)
    for name, limit in (("train", max_train), ("eval", max_eval)):
        if not parts[name]:
            raise DataError(f"config.finetune.task={task!r}: no {name} examples in the held-out documents")
        if len(parts[name]) > limit > 0:
            parts[name] = [parts[name][i] for i in sorted(rng.choice(len(parts[name]), limit, replace=False))]
    label_of = (lambda e: names.index(e["label"])) if task == "package" else (lambda e: e["label"])
    splits = {
        k: Split(
            np.stack([e["tokens"] for e in v]),
            np.stack([e["segment_ids"] for e in v]),
            np.asarray([label_of(e) for e in v], np.int32).reshape(len(v), -1),
        )
        for k, v in parts.items()
    }
    labels = splits["train"].labels
    counts = np.bincount(labels[labels != IGNORE].ravel()) if task != "span" else np.zeros([1])
    baseline = np.asarray([e["baseline"] for e in parts["eval"]], np.int32) if task == "span" else None
    return Suite(splits["train"], splits["eval"], names, int(np.argmax(counts)), baseline)
