"""A user's own corpus: a glob (or comma-separated globs/paths) of .txt and .jsonl files.

- .jsonl: one document per non-blank line, the string field `text_field` of its JSON object.
- .txt: cut into documents of a few KB at blank lines (at line ends when a paragraph runs long),
  so a single book still yields many documents and a held-out split.
About `eval_fraction` of the bytes, whole documents picked by hash, form 'validation'. The builder
config name hashes the resolved file list with sizes and mtimes: editing a file rebuilds.
Documents are held in memory while the dataset is written once.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import tensorflow_datasets as tfds
from etils import epath

from lm.data.builders.stdlib_source import heldout_units
from lm.errors import DataError
from lm.quiet import NoDownloadBanner

_KEY = "config.data.files"
MAX_CHUNK_CHARS = 4096


def resolve_files(files: str, extensions: tuple[str, ...] = (".txt", ".jsonl")) -> list[str]:
    """'a/*.txt,b.jsonl' -> sorted absolute file paths; DataError for a pattern matching no file
    or a file whose name ends with none of `extensions`."""
    patterns = [p.strip() for p in files.split(",") if p.strip()]
    kinds = " or ".join(extensions)
    if not patterns:
        raise DataError(f"{_KEY} is empty: set it to a glob of {kinds} files")
    paths = set()
    for pattern in patterns:
        matched = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataError(f"{_KEY}: no file matches {pattern!r}")
        for path in matched:
            if not path.endswith(extensions):
                raise DataError(f"{_KEY}: {path} is not a {kinds} file")
            paths.add(os.path.abspath(path))
    return sorted(paths)


def decode_utf8(data: bytes, path: str) -> str:
    """bytes -> str; DataError naming the file and line of the first invalid byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{_KEY}: {path} line {line} is not valid UTF-8") from None


def jsonl_documents(text: str, path: str, text_field: str) -> list[tuple[str, str]]:
    """[(key 'path:line', text)] for each non-blank line; DataError on bad JSON or a missing field."""
    docs = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{_KEY}: {path}:{number} is not valid JSON") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(
                f"{_KEY}: {path}:{number} has no string field {text_field!r} (config.data.text_field)"
            )
        if value.strip():
            docs.append((f"{path}:{number}", value))
    return docs


def split_text(text: str, chunk_chars: int) -> list[str]:
    """Cuts text into chunks of >= chunk_chars at blank lines, or at any line end past 2*chunk_chars.

    Blank lines at a cut are dropped; text inside a chunk is kept verbatim.
    """
    chunks, lines = [], []
    size = 0
    for line in text.split("\n"):
        blank = not line.strip()
        if lines and ((blank and size >= chunk_chars) or size >= 2 * chunk_chars):
            chunks.append("\n".join(lines).rstrip("\n"))
            lines, size = [], 0
        if lines or not blank:
            lines.append(line)
            size += len(line) + 1
    if lines:
        chunks.append("\n".join(lines).rstrip("\n"))
    return [c for c in chunks if c.strip()]


def txt_documents(text: str, path: str) -> list[tuple[str, str]]:
    """[(key 'path#chunk', text)]: about 20 chunks for a small file, MAX_CHUNK_CHARS for a big one."""
    chunk_chars = min(MAX_CHUNK_CHARS, max(256, len(text) // 20))
    return [(f"{path}#{k}", chunk) for k, chunk in enumerate(split_text(text, chunk_chars))]


def read_documents(path: str, text_field: str) -> list[tuple[str, str]]:
    """All documents of one file; DataError when it has none."""
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    docs = jsonl_documents(text, path, text_field) if path.endswith(".jsonl") else txt_documents(text, path)
    if not docs:
        raise DataError(f"{_KEY}: {path} is empty (no documents)")
    return docs


class TextFiles(NoDownloadBanner, tfds.core.GeneratorBasedBuilder):
    """User text files; splits 'train' and 'validation'; features text, path ('file:line' or 'file#chunk')."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "jsonl lines and ~4 KB .txt chunks; held-out documents by hash."}
    # Where TFDS looks for a checksums file; set so that it skips its importlib_resources lookup,
    # which fails without that package (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)

    def __init__(self, *, files: str, text_field: str = "text", eval_fraction: float = 0.05, **kwargs):
        """files: a glob or comma-separated globs/paths; kwargs go to tfds (data_dir, file_format)."""
        self._paths = resolve_files(files)
        self._text_field = text_field
        self._eval_fraction = eval_fraction
        stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self._paths]
        key = hashlib.sha256(json.dumps([stats, text_field, eval_fraction]).encode()).hexdigest()
        config = tfds.core.BuilderConfig(name=f"files-{key[:16]}", description=f"{len(self._paths)} files")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(files=self._paths, text_field=self._text_field),
        )

    def _split_generators(self, dl_manager):
        docs = [doc for path in self._paths for doc in read_documents(path, self._text_field)]
        if len(docs) < 2:
            raise DataError(f"{_KEY}: the corpus has {len(docs)} document; need 2 or more to hold one out")
        heldout = heldout_units({key: len(text.encode()) for key, text in docs}, self._eval_fraction)
        return {
            "train": self._generate_examples([d for d in docs if d[0] not in heldout]),
            "validation": self._generate_examples([d for d in docs if d[0] in heldout]),
        }

    def _generate_examples(self, docs: list[tuple[str, str]]):
        for key, text in docs:
            yield key, {"text": text, "path": key}
