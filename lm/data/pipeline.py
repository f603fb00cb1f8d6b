"""Corpus -> token streams -> packed rows -> the batch at step t, a pure function of (seed, t).

Packing. Every document becomes [BOS] + tokens + [EOS]; a split's documents are concatenated in
the dataset's stored order into one token stream of `num_tokens` ids. Row r is the window
stream[r*seq_len : r*seq_len + seq_len + 1]: consecutive rows overlap by one token, so every
token after the first is a target exactly once. The last row is padded (pad id, segment 0,
loss_mask 0). Within a row, segments are numbered 1, 2, 3... from each BOS (a document continued
from the previous row is segment 1, its positions restarting at 0), and a target is masked when
it is a BOS, i.e. when it would be predicted across a document boundary.

Caching. Under data_dir: the TFDS dataset (`<builder>/<config>/<version>`), the sentencepiece
model (`tokenizers/<dataset key>/`), and the token streams with their statistics
(`tokens/<dataset key>/<tokenizer identity>/<split>.npy|.json`, written atomically, memory-mapped
when read). An fcntl lock on `data_dir/.prepare.lock` serialises preparation across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from lm import metrics as metrics_lib
from lm import sharding
from lm.data import tokenizer as tokenizer_lib
from lm.data.tokenizer import ByteTokenizer, Tokenizer
from lm.errors import DataError
from lm.quiet import quiet_libraries

_SOURCES = "'stdlib', 'text_files' or 'tfds:<name>'"
READ_BATCH = 512  # documents per data-source read and per encode_batch call


class PackedRows:
    """One split's token stream seen as rows of seq_len (+1 for the shifted targets)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        bos_id: int = tokenizer_lib.BOS_ID,
        pad_id: int = tokenizer_lib.PAD_ID,
    ):
        """tokens: [num_tokens] int (may be a memmap), documents as [BOS] + ids + [EOS]."""
        if seq_len < 1 or len(tokens) < 2:
            raise ValueError(f"need seq_len >= 1 and >= 2 tokens, got {seq_len} and {len(tokens)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.num_tokens = len(tokens)
        self.num_rows = -(-(self.num_tokens - 1) // seq_len)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """indices: [n] ints in [0, num_rows) -> `pack_window` of those rows, each [n, seq_len]."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row indices must lie in [0, {self.num_rows})")
        offsets = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [n, seq_len + 1]
        valid = offsets < self.num_tokens
        window = np.asarray(self.tokens[np.minimum(offsets, self.num_tokens - 1)]).astype(np.int32)
        return pack_window(np.where(valid, window, self.pad_id), valid, self.bos_id)


def pack_window(
    window: np.ndarray, valid: np.ndarray, bos_id: int, starts: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Model inputs of rows cut from a token stream.

    window: [n, seq_len + 1] int token ids; valid: [n, seq_len + 1] bool, False for padding
    (padding only at the end of a row); starts: [n, seq_len + 1] bool, True where a segment
    (document, example) begins, default where window is bos_id. Returns inputs, targets,
    segment_ids, positions: [n, seq_len] int32, and loss_mask: [n, seq_len] float32.
    """
    inputs, targets = window[:, :-1], window[:, 1:]
    column = np.arange(inputs.shape[1])
    real = valid[:, :-1]
    starts = (inputs == bos_id if starts is None else starts[:, :-1]) | (column == 0)
    segment_ids = np.cumsum(starts, axis=1) * real
    segment_start = np.maximum.accumulate(np.where(starts, column, 0), axis=1)
    positions = (column - segment_start) * real
    loss_mask = real & valid[:, 1:] & (targets != bos_id)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
    }


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """[num_rows] the row order of one epoch."""
    permutation = np.random.default_rng([seed, epoch]).permutation(num_rows)
    permutation.flags.writeable = False
    return permutation


def global_row_ids(
    num_rows: int,
    step: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """[global_batch_size // process_count] row ids: this process' contiguous slice of step's batch.

    Global row g = step * global_batch_size + i is row permutation(epoch)[g % num_rows], with
    epoch = g // num_rows and the permutation seeded by (seed, epoch).
    """
    mine = sharding.process_slice(global_batch_size, process_index, process_count)
    g = step * global_batch_size + np.arange(mine.start, mine.stop, dtype=np.int64)
    epochs, offsets = np.divmod(g, num_rows)
    ids = np.empty_like(g)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        ids[here] = _epoch_permutation(num_rows, seed, int(epoch))[offsets[here]]
    return ids


def batch_at_step(
    rows: PackedRows,
    step: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This process' part of the training batch at `step`: each array
    [global_batch_size // process_count, seq_len]."""
    return rows.rows(
        global_row_ids(rows.num_rows, step, global_batch_size, seed, process_index, process_count)
    )


def eval_batches(
    rows: PackedRows, batch_size: int, num_batches: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-order batches from row 0: each array [batch_size // process_count, seq_len].

    num_batches <= 0 (or more than there are) -> ceil(num_rows / batch_size) batches covering every
    row once; the last batch is filled with all-padding rows (loss_mask 0).
    """
    mine = sharding.process_slice(batch_size, process_index, process_count)
    total = -(-rows.num_rows // batch_size)
    for b in range(total if num_batches <= 0 else min(num_batches, total)):
        ids = b * batch_size + np.arange(mine.start, mine.stop)
        real = ids < rows.num_rows
        batch = rows.rows(np.where(real, ids, 0))
        yield {
            k: np.where(real[:, None], v, rows.pad_id if k in ("inputs", "targets") else 0).astype(v.dtype)
            for k, v in batch.items()
        }


def unigram_entropy(rows_or_tokens: PackedRows | np.ndarray, vocab_size: int) -> float:
    """Entropy in nats/token of the unigram distribution of the predicted tokens.

    For PackedRows: every stream token except BOS (exactly the targets with loss_mask 1). For a
    token array [n]: all of it. A model that learnt only token frequencies reaches this eval loss.
    """
    if isinstance(rows_or_tokens, PackedRows):
        tokens = np.asarray(rows_or_tokens.tokens)
        tokens = tokens[tokens != rows_or_tokens.bos_id]
    else:
        tokens = np.asarray(rows_or_tokens).ravel()
    p = np.bincount(tokens, minlength=vocab_size) / max(tokens.size, 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def bigram_cross_entropy(train: PackedRows, heldout: PackedRows, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of a bigram model counted on the train stream.

    P(next | prev) = lam * count(prev, next) / count(prev) + (1 - lam) * add-one unigram, with lam
    chosen on the held-out split itself: an optimistic bigram, so beating it is a conservative
    claim. Pairs are the (input, target) pairs a model is scored on: never across documents.
    """

    def pairs(rows):
        tokens = np.asarray(rows.tokens).astype(np.int64)
        prev, nxt = tokens[:-1], tokens[1:]
        keep = nxt != rows.bos_id
        return prev[keep], nxt[keep]

    prev, nxt = pairs(train)
    codes, counts = np.unique(prev * vocab_size + nxt, return_counts=True)
    prev_counts = np.bincount(prev, minlength=vocab_size)
    unigram = (np.bincount(nxt, minlength=vocab_size) + 1.0) / (nxt.size + vocab_size)
    eval_prev, eval_next = pairs(heldout)
    eval_codes = eval_prev * vocab_size + eval_next
    at = np.minimum(np.searchsorted(codes, eval_codes), codes.size - 1)
    pair_counts = np.where(codes[at] == eval_codes, counts[at], 0)
    p_bigram = pair_counts / np.maximum(prev_counts[eval_prev], 1)
    p_unigram = unigram[eval_next]
    return float(
        min(-np.mean(np.log(lam * p_bigram + (1 - lam) * p_unigram)) for lam in np.linspace(0.0, 0.99, 100))
    )


@dataclasses.dataclass
class LMData:
    """What `prepare_data` returns: the tokenizer, both splits as packed rows, and a json-able info dict."""

    tokenizer: Tokenizer
    train: PackedRows
    eval: PackedRows
    info: dict


@dataclasses.dataclass
class Corpus:
    """A prepared TFDS dataset and which of its splits and features hold the documents."""

    builder: object  # tfds.core.DatasetBuilder
    text_field: str
    eval_split: str

    @property
    def key(self) -> str:
        """'<builder>/<config>/<version>/<text_field>': identifies the documents."""
        config = self.builder.builder_config.name if self.builder.builder_config else "default"
        return f"{self.builder.name}/{config}/{self.builder.version}/{self.text_field}"

    def texts(self, split: str) -> Iterator[str]:
        """The split's documents, decoded from UTF-8, in stored order."""
        for record in read_records(self.builder, split):
            value = record[self.text_field]
            yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_records(builder, split: str) -> Iterator[dict]:
    """The records of one split of a prepared TFDS builder, in stored order, read in batches."""
    source = builder.as_data_source(split=split)
    for start in range(0, len(source), READ_BATCH):
        yield from source.__getitems__(list(range(start, min(start + READ_BATCH, len(source)))))


def prepare_data(data_cfg, tokenizer_cfg, seq_len: int) -> LMData:
    """Builds (or reuses) the dataset, tokenizer and token streams under the data dir.

    data_cfg: source ('stdlib' | 'text_files' | 'tfds:<name>'), files, text_field, data_dir
    ('' -> $LM_DATA_DIR or ~/.cache/lm/data), eval_fraction. tokenizer_cfg: kind ('sentencepiece'
    | 'byte'), vocab_size, model_type ('bpe' | 'unigram'), split_digits, path ('' -> train on the
    train split once and cache it in the data dir; else load that file). User mistakes raise DataError.
    What is built rather than read from the cache is announced in one line (`first_run_note`).
    """
    data_dir = resolve_data_dir(config_get(data_cfg, "data_dir", ""))
    os.makedirs(data_dir, exist_ok=True)
    source = config_get(data_cfg, "source", "stdlib")
    with file_lock(os.path.join(data_dir, ".prepare.lock")), first_run_note(source, data_dir) as begin:
        corpus = open_corpus(data_cfg, data_dir, begin)
        tokenizer, tokenizer_path = get_tokenizer(tokenizer_cfg, corpus, data_dir, begin)
        cache_dir = os.path.join(data_dir, "tokens", corpus.key, tokenizer.identity)
        train, train_stats = tokenize_split(corpus, "train", tokenizer, cache_dir, begin)
        evals, eval_stats = tokenize_split(corpus, corpus.eval_split, tokenizer, cache_dir, begin)
    metadata = corpus.builder.info.metadata or {}
    info = {
        "source": source,
        "dataset": corpus.builder.name,
        "config": corpus.builder.builder_config.name if corpus.builder.builder_config else None,
        "version": str(corpus.builder.version),
        "dataset_dir": os.fspath(corpus.builder.data_dir),
        "text_field": corpus.text_field,
        **{
            k: metadata[k]
            for k in ("python_version", "file_list_sha256", "heldout_packages")
            if k in metadata
        },
        "splits": {"train": train_stats, "eval": {"split": corpus.eval_split, **eval_stats}},
        "bytes_per_token": eval_stats["bytes_per_token"],
        "tokenizer": {
            "kind": "byte" if isinstance(tokenizer, ByteTokenizer) else "sentencepiece",
            "path": tokenizer_path,
            "vocab_size": tokenizer.vocab_size,
            "identity": tokenizer.identity,
        },
    }
    return LMData(
        tokenizer=tokenizer,
        train=PackedRows(train, seq_len, tokenizer.bos_id, tokenizer.pad_id),
        eval=PackedRows(evals, seq_len, tokenizer.bos_id, tokenizer.pad_id),
        info=info,
    )


def resolve_data_dir(data_dir: str) -> str:
    """'' -> $LM_DATA_DIR, else ~/.cache/lm/data; '~' expanded; absolute."""
    data_dir = data_dir or os.environ.get("LM_DATA_DIR", "") or "~/.cache/lm/data"
    return os.path.abspath(os.path.expanduser(data_dir))


def _nothing() -> None:
    """The default `begin` of the preparation steps: announce nothing."""


@contextlib.contextmanager
def first_run_note(what: str, data_dir: str) -> Iterator[Callable[[], None]]:
    """Yields begin(), which a step calls when it builds something rather than reading the cache.

    begin()'s first call prints 'preparing data <what> (first run only; cached in <data_dir>) ... ';
    leaving the block then ends that line with 'done in N s', or with just a newline when the block
    raised, so that the error starts on a line of its own. Nothing is printed when nothing began.
    """
    started: list[float] = []

    def begin() -> None:
        if not started:
            print(f"preparing data {what} (first run only; cached in {data_dir}) ... ", end="", flush=True)
            started.append(time.perf_counter())

    try:
        yield begin
    except BaseException:
        if started:
            print(flush=True)
        raise
    if started:
        print(f"done in {time.perf_counter() - started[0]:.0f} s", flush=True)


def prepare_builder(builder, begin: Callable[[], None] = _nothing) -> None:
    """builder.download_and_prepare() unless the builder is prepared; calls begin() first."""
    if not builder.is_prepared():
        begin()
        builder.download_and_prepare()


def open_corpus(data_cfg, data_dir: str, begin: Callable[[], None] = _nothing) -> Corpus:
    """Prepares (once) the dataset `data_cfg.source` names as ArrayRecord under data_dir.

    begin: called before building anything (`first_run_note`)."""
    quiet_libraries()
    from lm.data.builders import BUILDERS

    source = config_get(data_cfg, "source", "stdlib")
    eval_fraction = float(config_get(data_cfg, "eval_fraction", 0.05))
    common = dict(data_dir=data_dir, file_format="array_record")
    if source == "stdlib":
        builder = BUILDERS["stdlib"](eval_fraction=eval_fraction, **common)
    elif source == "text_files":
        builder = BUILDERS["text_files"](
            files=config_get(data_cfg, "files", ""),
            text_field=config_get(data_cfg, "text_field", "text"),
            eval_fraction=eval_fraction,
            **common,
        )
    elif isinstance(source, str) and source.startswith("tfds:"):
        return _open_tfds(source.removeprefix("tfds:"), config_get(data_cfg, "text_field", "text"), common)
    else:
        raise DataError(f"config.data.source: unknown source {source!r}; expected {_SOURCES}")
    prepare_builder(builder, begin)
    return Corpus(builder, "text", "validation")


def _open_tfds(name: str, text_field: str, builder_kwargs: dict) -> Corpus:
    """A registered TFDS dataset; downloads and prepares it when missing (under TFDS's own banner,
    which gives the download size, so before our `first_run_note` line begins)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, **builder_kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"config.data.source: no TFDS dataset named {name!r}") from None
    features = builder.info.features
    if text_field not in features or not isinstance(features[text_field], tfds.features.Text):
        raise DataError(
            f"config.data.text_field: {text_field!r} is not a text feature of TFDS dataset {name!r} "
            f"(features: {', '.join(sorted(features))})"
        )
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as e:  # offline, missing optional dependency, ...: the user must act.
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise DataError(
                f"config.data.source: cannot download/prepare TFDS dataset {name!r} into "
                f"{builder_kwargs['data_dir']}: {type(e).__name__}: {first_line}"
            ) from None
    splits = builder.info.splits
    if "train" not in splits or not ({"validation", "test"} & set(splits)):
        raise DataError(
            f"config.data.source: TFDS dataset {name!r} needs a 'train' and a 'validation' or "
            f"'test' split (has: {', '.join(sorted(splits))})"
        )
    return Corpus(builder, text_field, "validation" if "validation" in splits else "test")


def get_tokenizer(
    tokenizer_cfg, corpus: Corpus, data_dir: str, begin: Callable[[], None] = _nothing
) -> tuple[Tokenizer, str | None]:
    """The configured tokenizer and the file it lives in (None for the byte tokenizer).

    A sentencepiece model is trained on the corpus' train split once (after calling begin()) and
    cached under data_dir.
    """
    kind = config_get(tokenizer_cfg, "kind", "sentencepiece")
    if kind == "byte":
        return ByteTokenizer(), None
    if kind != "sentencepiece":
        raise DataError(f"config.tokenizer.kind: unknown kind {kind!r}; expected 'sentencepiece' or 'byte'")
    path = config_get(tokenizer_cfg, "path", "")
    if path:
        if not os.path.isfile(path):
            raise DataError(f"config.tokenizer.path: no such file {path!r}")
        return tokenizer_lib.load_tokenizer(path), os.path.abspath(path)
    vocab_size = int(config_get(tokenizer_cfg, "vocab_size", 4096))
    model_type = config_get(tokenizer_cfg, "model_type", "bpe")
    split_digits = bool(config_get(tokenizer_cfg, "split_digits", True))
    name = f"spm-{tokenizer_lib.RECIPE}-{model_type}-v{vocab_size}-digits{int(split_digits)}.model"
    path = os.path.join(data_dir, "tokenizers", corpus.key, name)
    if os.path.exists(path):
        return tokenizer_lib.load_tokenizer(path), path
    begin()
    return tokenizer_lib.train_sentencepiece(
        corpus.texts("train"), path, vocab_size, model_type, split_digits
    ), path


def tokenize_split(
    corpus: Corpus, split: str, tokenizer: Tokenizer, cache_dir: str, begin: Callable[[], None] = _nothing
) -> tuple[np.ndarray, dict]:
    """The split's token stream [num_tokens] (memory-mapped from the cache) and its statistics;
    begin() is called before tokenizing a split that is not cached."""
    stream_path = os.path.join(cache_dir, f"{split}.npy")
    stats_path = os.path.join(cache_dir, f"{split}.json")
    if not os.path.exists(stats_path):
        begin()
        tokens, stats = tokenize_documents(corpus.texts(split), tokenizer)
        if not stats["num_docs"]:
            raise DataError(f"config.data.source: split {split!r} of {corpus.key} has no documents")
        os.makedirs(cache_dir, exist_ok=True)
        _atomic_save_npy(stream_path, tokens)
        metrics_lib.write_atomic(stats_path, json.dumps(stats, indent=1))
    with open(stats_path) as f:
        stats = json.load(f)
    return np.load(stream_path, mmap_mode="r"), stats


def tokenize_documents(texts: Iterable[str], tokenizer: Tokenizer) -> tuple[np.ndarray, dict]:
    """Documents -> the stream [sum(len(doc) + 2)] of [BOS] + ids + [EOS] per document, and
    statistics: num_docs, num_tokens (with BOS/EOS), num_bytes (UTF-8), bytes_per_token
    (num_bytes per token without BOS/EOS)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    parts, batch = [], []
    num_docs = num_bytes = 0

    def flush():
        flat: list[int] = []
        for ids in tokenizer.encode_batch(batch):
            flat.append(tokenizer.bos_id)
            flat.extend(ids)
            flat.append(tokenizer.eos_id)
        parts.append(np.array(flat, dtype=dtype))
        batch.clear()

    for text in texts:
        batch.append(text)
        num_docs += 1
        num_bytes += len(text.encode("utf-8"))
        if len(batch) == READ_BATCH:
            flush()
    if batch:
        flush()
    tokens = np.concatenate(parts) if parts else np.zeros([0], dtype)
    text_tokens = len(tokens) - 2 * num_docs
    stats = {
        "num_docs": num_docs,
        "num_tokens": int(len(tokens)),
        "num_bytes": num_bytes,
        "bytes_per_token": num_bytes / max(text_tokens, 1),
    }
    return tokens, stats


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
    """np.save through `metrics.atomic_path`."""
    with metrics_lib.atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive fcntl lock held for the `with` body (blocks until other holders finish)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def config_get(cfg, key: str, default):
    """cfg[key] for a dict or ConfigDict, `default` when the key is absent."""
    return cfg.get(key, default) if cfg is not None else default
