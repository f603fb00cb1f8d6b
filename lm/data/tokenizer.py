"""Tokenizers: a sentencepiece model trained for exact round trips of code, and a byte tokenizer.

Both share the same small interface (`Tokenizer`) and reserve ids 0, 1, 2 for pad, BOS, EOS.

Sentencepiece is set up so that `decode(encode(text)) == text` for any text:
identity normalisation, no dummy prefix, no whitespace collapsing, byte fallback for every
character outside the vocabulary. Two details make it compress code:
- Sentencepiece never sees a raw newline: "\n" is mapped to `NEWLINE` ("↵") before training and
  encoding, so a newline can merge with what follows it ("↵▁▁▁▁def", one token).
- Training "sentences" are multi-line chunks of about `TRAIN_CHUNK_CHARS` characters and
  `split_by_whitespace=False`, so pieces can span spaces and line breaks (indentation runs,
  "(self):", "↵▁▁▁▁return▁").
A literal "▁" or "↵" in the input is encoded as its UTF-8 bytes (byte-fallback pieces), so the two
marker characters stay unambiguous. Decoding is a table lookup of each id's bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from lm.errors import DataError
from lm.metrics import write_atomic

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPACE = "\u2581"  # sentencepiece's whitespace marker "▁"
NEWLINE = "\u21b5"  # stands for "\n" inside sentencepiece: "↵"
_MARKERS = re.compile(f"([{SPACE}{NEWLINE}])")
TRAIN_CHUNK_CHARS = 1000
# Chunks sampled for training, ~20 MB for BPE; unigram's seeding and EM cost more per byte, so it
# gets less text and a lighter schedule (on the stdlib: ~12 s, 3.8 bytes/token, as good as BPE).
TRAIN_SENTENCES = {"bpe": 20_000, "unigram": 2_500}
# Sentencepiece's result depends on its thread count (and on its own sampling across processes),
# so we sample in Python and fix the threads: the same corpus gives the same model on any machine.
TRAIN_THREADS = 2
_BYTE_FORMAT = "lm-byte-tokenizer-v1"
RECIPE = "code1"  # names cached models: bump when the training recipe below changes


class Tokenizer(Protocol):
    """What the data pipeline, the model and sampling need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    identity: str  # short stable hash: keys the token caches

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self) -> np.ndarray: ...
    def save(self, path: str | os.PathLike) -> None: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: id = byte + 3; ids 0, 1, 2 are pad, BOS, EOS. vocab_size = 259."""

    vocab_size = 256 + 3
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    identity = "byte"

    def encode(self, text: str) -> list[int]:
        """text -> [len(text.encode())] ids in [3, 259)."""
        return [b + 3 for b in text.encode("utf-8")]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids below 3 (pad/BOS/EOS) decode to nothing; invalid UTF-8 becomes U+FFFD."""
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """[vocab_size] int64: 0 for the three control ids, 1 for every byte."""
        return np.array([0, 0, 0] + [1] * 256, dtype=np.int64)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps({"format": _BYTE_FORMAT}).encode())


class SentencePieceTokenizer:
    """A trained sentencepiece model (see the module docstring for the conventions)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.identity = hashlib.sha256(model_proto).hexdigest()[:16]
        self._bytes = [_piece_bytes(self._sp, i) for i in range(self.vocab_size)]
        self._byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._threads = len(os.sched_getaffinity(0))

    def encode(self, text: str) -> list[int]:
        """text -> ids (no BOS/EOS)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """[n] texts -> [n] id lists, encoded on all CPU cores."""
        marked = {i for i, t in enumerate(texts) if _MARKERS.search(t)}
        plain = [t.replace("\n", NEWLINE) for i, t in enumerate(texts) if i not in marked]
        encoded = iter(self._sp.encode(plain, num_threads=self._threads))
        return [self._encode_with_markers(t) if i in marked else next(encoded) for i, t in enumerate(texts)]

    def _encode_with_markers(self, text: str) -> list[int]:
        """Encodes literal "▁"/"↵" characters as byte pieces and the text between them normally."""
        ids: list[int] = []
        for k, part in enumerate(_MARKERS.split(text)):
            if k % 2:
                ids.extend(self._byte_ids[b] for b in part.encode("utf-8"))
            elif part:
                ids.extend(self._sp.encode(part.replace("\n", NEWLINE)))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Concatenates each id's bytes; control ids decode to nothing; bad UTF-8 becomes U+FFFD."""
        table = self._bytes
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """[vocab_size] int64: UTF-8 bytes per id (0 for control ids, 1 for byte-fallback pieces)."""
        return np.array([len(b) for b in self._bytes], dtype=np.int64)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, self._proto)


def _piece_bytes(sp, i: int) -> bytes:
    """The bytes that id `i` stands for in decoded text."""
    piece = sp.id_to_piece(i)
    if sp.is_control(i) or sp.is_unknown(i):
        return b""
    if sp.is_byte(i):  # "<0xAB>"
        return bytes([int(piece[3:5], 16)])
    return piece.replace(SPACE, " ").replace(NEWLINE, "\n").encode("utf-8")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a file written by `save` (a sentencepiece .model, or the byte tokenizer's marker)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"tokenizer file {os.fspath(path)!r} cannot be read: {e.strerror}") from None
    if data.startswith(b"{") and _BYTE_FORMAT.encode() in data:
        return ByteTokenizer()
    try:
        return SentencePieceTokenizer(data)
    except RuntimeError:
        raise DataError(f"tokenizer file {os.fspath(path)!r} is not a sentencepiece model") from None


def training_sentences(texts: Iterable[str], chunk_chars: int = TRAIN_CHUNK_CHARS) -> Iterator[str]:
    """Cuts documents at line ends into chunks of about `chunk_chars`, with "\n" -> NEWLINE.

    Lines (and their newlines) stay whole, so pieces can learn "↵" + indentation. Chunks longer
    than sentencepiece's 4192-byte sentence limit (one huge line) are dropped by the trainer.
    """
    for text in texts:
        lines = text.replace("\n", NEWLINE).split(NEWLINE)
        buf = ""
        for k, line in enumerate(lines):
            buf += (NEWLINE if k else "") + line
            if len(buf) >= chunk_chars:
                yield buf
                buf = ""
        if buf:
            yield buf


def sample(items: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of k items (all if fewer) in one pass: reservoir sampling, seeded."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    for n, item in enumerate(items):
        if n < k:
            reservoir.append(item)
        elif (j := rng.randrange(n + 1)) < k:
            reservoir[j] = item
    return reservoir


def train_sentencepiece(
    texts: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    split_digits: bool = True,
) -> SentencePieceTokenizer:
    """Trains on `texts` (a corpus' train split), writes the model to `path` atomically, returns it.

    Raises DataError when the corpus is too small for `vocab_size`.
    """
    import sentencepiece as spm

    if model_type not in TRAIN_SENTENCES:
        raise DataError(f"config.tokenizer.model_type: {model_type!r}; expected 'bpe' or 'unigram'")
    sentences = sample(training_sentences(texts), TRAIN_SENTENCES[model_type], seed=0)
    unigram = dict(
        seed_sentencepiece_size=max(20_000, 4 * vocab_size), shrinking_factor=0.5, num_sub_iterations=1
    )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            split_digits=split_digits,
            num_threads=TRAIN_THREADS,
            character_coverage=0.9995,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_by_whitespace=False,
            split_by_unicode_script=False,
            max_sentencepiece_length=16,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            minloglevel=2,
            **(unigram if model_type == "unigram" else {}),
        )
    except RuntimeError as e:
        message = str(e).strip().splitlines()[-1]
        raise DataError(
            f"config.tokenizer.vocab_size={vocab_size}: sentencepiece training failed: {message}"
        ) from None
    tokenizer = SentencePieceTokenizer(model.getvalue())
    tokenizer.save(path)
    return tokenizer
