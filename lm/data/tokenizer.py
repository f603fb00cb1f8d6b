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

A third kind, `HFTokenizer`, wraps a Hugging Face `tokenizers` tokenizer (a model's
tokenizer.json, read with `hf_tokenizer_from_dir`) with that model's special ids and chat
template. `write_hf_tokenizer` exports any of the three as a Hugging Face tokenizer directory that
`transformers.AutoTokenizer` loads and that encodes the same ids (see `as_hf_tokenizer`).
"""

from __future__ import annotations

import datetime
import functools
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
_HF_FORMAT = "lm-hf-tokenizer-v1"
_HF_PREFIX = b'{"format": "lm-hf-tokenizer-v1"'  # how `HFTokenizer.save` files begin
RECIPE = "code1"  # names cached models: bump when the training recipe below changes


class Tokenizer(Protocol):
    """What the data pipeline, the model and sampling need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    identity: str  # short stable hash: keys the token caches
    adds_bos: bool  # whether prompts (and SFT examples) start with bos_id: see `bos_prefix`

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
    adds_bos = True

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
    adds_bos = True

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


def bos_prefix(tokenizer: Tokenizer) -> list[int]:
    """The ids a prompt starts with before its text: [bos_id], or [] for a Hugging Face tokenizer
    whose post-processor adds no BOS (GPT-2, Qwen2), as `transformers` encodes prompts."""
    return [tokenizer.bos_id] if getattr(tokenizer, "adds_bos", True) else []


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a file written by `save`: a sentencepiece .model, the byte tokenizer's marker, or the
    JSON wrapper of an `HFTokenizer`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"tokenizer file {os.fspath(path)!r} cannot be read: {e.strerror}") from None
    if data.startswith(_HF_PREFIX):
        return _load_hf(data, path)
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


# Hugging Face tokenizers ----------------------------------------------------------------------------

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token
# The model files that name special tokens, most specific first: tokens by name, then ids.
_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_ID_FILES = ("generation_config.json", "config.json")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (a model's tokenizer.json) with the model's special ids.

    encode adds no special tokens (the data pipeline adds BOS/EOS ids itself) but, as transformers
    does, a special token written in the text ("<|im_start|>", "</s>") becomes its id: rendered chat
    templates rely on it. decode drops special tokens. `chat_template` is the model's Jinja chat
    template (None if it has none), rendered by `apply_chat_template`. `adds_bos`: whether the
    post-processor puts bos_id before a text (Llama's does, GPT-2's does not); prompts get a BOS
    exactly then (`bos_prefix`), as transformers' `tok(text)` encodes them.
    """

    def __init__(
        self, tokenizer_json: str, bos_id: int, eos_id: int, pad_id: int, chat_template: str | None = None
    ):
        """tokenizer_json: the text of a tokenizer.json; raises DataError when it does not parse or a
        special id lies outside the vocabulary."""
        self._tok = _parse_tokenizer_json(tokenizer_json, "tokenizer.json")
        self._spec = json.loads(tokenizer_json)
        self.tokenizer_json = tokenizer_json
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        for name, i in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if not 0 <= i < self.vocab_size:
                raise DataError(
                    f"HF tokenizer: {name}={i} lies outside the vocabulary [0, {self.vocab_size})"
                )
        self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
        self.chat_template = chat_template
        self.adds_bos = _post_processor_adds_bos(self._tok, self.bos_id)
        self.identity = hashlib.sha256(self._saved()).hexdigest()[:16]
        self._token_bytes: np.ndarray | None = None

    @property
    def bos_token(self) -> str:
        return self._tok.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self._tok.id_to_token(self.eos_id)

    @property
    def pad_token(self) -> str:
        return self._tok.id_to_token(self.pad_id)

    @property
    def unk_token(self) -> str | None:
        """The model's unknown token (BPE/Unigram/WordPiece models that have one), else None."""
        model = self._spec.get("model") or {}
        if model.get("type") == "Unigram" and model.get("unk_id") is not None:
            return self._tok.id_to_token(model["unk_id"])
        return model.get("unk_token")

    def encode(self, text: str) -> list[int]:
        """text -> ids (no BOS/EOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """[n] texts -> [n] id lists, encoded on all CPU cores."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; special tokens decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """[vocab_size] int64: the bytes each id stands for in text, 0 for special tokens.

        Byte-level BPE (GPT-2, Llama-3, Qwen2) maps each character back through the byte-to-unicode
        table; byte-fallback tokens "<0xNN>" count 1; metaspace tokenizers (sentencepiece style,
        Llama-2) count "▁" as the space it stands for, so a dummy prefix ("▁" prepended to each
        encoded text) counts one byte more than the decoded text has.
        """
        if self._token_bytes is None:
            self._token_bytes = _hf_token_bytes(self._tok, self._spec, self.vocab_size)
        return self._token_bytes

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Renders [n] messages ({'role': ..., 'content': ...}) with the chat template as transformers'
        `apply_chat_template(messages, tokenize=False)` does; DataError without a template."""
        if self.chat_template is None:
            raise DataError(
                "HF tokenizer: apply_chat_template needs a chat template; this tokenizer has none"
            )
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.unk_token is not None:
            special["unk_token"] = self.unk_token
        return render_chat_template(self.chat_template, messages, add_generation_prompt, **special)

    def save(self, path: str | os.PathLike) -> None:
        """One JSON file (`load_tokenizer` reads it back): the tokenizer.json text, ids, chat template."""
        write_atomic(path, self._saved())

    def _saved(self) -> bytes:
        wrapper = {
            "format": _HF_FORMAT,  # first: load_tokenizer recognises the file by its start
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "chat_template": self.chat_template,
            "tokenizer_json": self.tokenizer_json,
        }
        return json.dumps(wrapper, ensure_ascii=False).encode("utf-8")

    def __eq__(self, other) -> bool:
        return isinstance(other, HFTokenizer) and self._saved() == other._saved()

    def __hash__(self) -> int:
        return hash(self.identity)


def _parse_tokenizer_json(text: str, where: str):
    """A `tokenizers.Tokenizer` from tokenizer.json text; DataError naming `where` when it does not parse."""
    from tokenizers import Tokenizer as RustTokenizer

    try:
        return RustTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: not a tokenizer.json the tokenizers library reads: {message}") from None


def _post_processor_adds_bos(tok, bos_id: int) -> bool:
    """Whether a `tokenizers.Tokenizer` with special tokens added puts bos_id before a text's ids."""
    text = "a b"
    plain = tok.encode(text, add_special_tokens=False).ids
    full = tok.encode(text, add_special_tokens=True).ids
    return len(full) > len(plain) and full[:1] == [bos_id] and full[1 : 1 + len(plain)] == plain


def _load_hf(data: bytes, path: str | os.PathLike) -> HFTokenizer:
    """An HFTokenizer from the bytes `HFTokenizer.save` wrote."""
    try:
        wrapper = json.loads(data)
        fields = [wrapper[k] for k in ("tokenizer_json", "bos_id", "eos_id", "pad_id")]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"tokenizer file {os.fspath(path)!r} is a damaged {_HF_FORMAT} file: {e}") from None
    return HFTokenizer(*fields, chat_template=wrapper.get("chat_template"))


def _has_type(spec, kind: str) -> bool:
    """Whether a tokenizer.json component (or one in its Sequence) has type `kind`."""
    if isinstance(spec, dict):
        return spec.get("type") == kind or any(_has_type(v, kind) for v in spec.values())
    if isinstance(spec, list):
        return any(_has_type(v, kind) for v in spec)
    return False


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each of the 256 bytes -> a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


def _hf_token_bytes(tok, spec: dict, vocab_size: int) -> np.ndarray:
    """[vocab_size] int64 bytes per id of a `tokenizers.Tokenizer` (see HFTokenizer.token_bytes)."""
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(
        spec.get("decoder"), "ByteLevel"
    )
    parts = [spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")]
    metaspace = SPACE in json.dumps(parts, ensure_ascii=False)
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    byte_chars = set(bytes_to_unicode().values())
    lengths = np.zeros(vocab_size, np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i in added:  # added tokens are matched and decoded as literal text
            lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
        elif byte_fallback and _BYTE_PIECE.fullmatch(token):
            lengths[i] = 1
        elif byte_level and all(c in byte_chars for c in token):
            lengths[i] = len(token)
        else:
            lengths[i] = len((token.replace(SPACE, " ") if metaspace else token).encode("utf-8"))
    return lengths


def hf_tokenizer_from_dir(hf_dir: str | os.PathLike) -> HFTokenizer:
    """The tokenizer of a local Hugging Face model directory (tokenizer.json required).

    Special tokens: bos/eos/pad by name from tokenizer_config.json then special_tokens_map.json,
    else by id from generation_config.json then config.json (a list of eos ids: the first). Absent
    pad falls back to eos (what transformers users do for models without one) and absent bos to eos
    (GPT-2 style: the pipeline needs a BOS id to start each document). The chat template comes from
    chat_template.jinja, else tokenizer_config.json's "chat_template" (a named list: 'default').
    """
    hf_dir = os.fspath(hf_dir)
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise DataError(f"HF model directory {hf_dir!r} has no tokenizer.json (a fast tokenizer's file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tok = _parse_tokenizer_json(text, path)
    configs = {name: _read_json_object(os.path.join(hf_dir, name)) for name in (*_TOKEN_FILES, *_ID_FILES)}
    ids = {kind: _special_id(kind, tok, configs, hf_dir) for kind in ("bos", "eos", "pad")}
    if ids["eos"] is None:
        raise DataError(
            f"HF model directory {hf_dir!r}: no eos token in {', '.join(_TOKEN_FILES + _ID_FILES)}"
        )
    bos = ids["eos"] if ids["bos"] is None else ids["bos"]
    pad = ids["eos"] if ids["pad"] is None else ids["pad"]
    return HFTokenizer(text, bos, ids["eos"], pad, _chat_template(hf_dir, configs["tokenizer_config.json"]))


def _read_json_object(path: str) -> dict:
    """A JSON object file's contents, {} when the file is absent; DataError when it is not an object."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _special_id(kind: str, tok, configs: dict[str, dict], hf_dir: str) -> int | None:
    """The id of the `kind` ('bos' | 'eos' | 'pad') token named in the model's files, or None."""
    for name in _TOKEN_FILES:
        value = configs[name].get(f"{kind}_token")
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str):
            i = tok.token_to_id(content)
            if i is None:
                raise DataError(
                    f"{os.path.join(hf_dir, name)}: {kind}_token {content!r} is not in the vocabulary "
                    "of tokenizer.json"
                )
            return i
    for name in _ID_FILES:
        value = configs[name].get(f"{kind}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _chat_template(hf_dir: str, tokenizer_config: dict) -> str | None:
    """The directory's chat template (see hf_tokenizer_from_dir), None if it has none."""
    path = os.path.join(hf_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(
            f"{os.path.join(hf_dir, 'tokenizer_config.json')}: chat_template must be a Jinja string "
            "or a list of {'name', 'template'} with a 'default'"
        )
    return template


@functools.lru_cache(maxsize=8)
def _compile_chat_template(template: str):
    """A Jinja template in the environment transformers renders chat templates in."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """{% generation %}...{% endgeneration %} (transformers marks assistant text with it): its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template line {e.lineno}: Jinja syntax error: {e.message}") from None


def render_chat_template(
    template: str, messages: Sequence[dict], add_generation_prompt: bool = True, **special_tokens: str
) -> str:
    """Renders a Jinja chat template with `messages`, `add_generation_prompt`, tools/documents None,
    and the special token names (bos_token=..., eos_token=...). An error the template raises
    (raise_exception) is a DataError."""
    import jinja2

    try:
        return _compile_chat_template(template).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"chat template: {e}") from None


# Exporting ours as Hugging Face tokenizers.

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def as_hf_tokenizer(tok: Tokenizer) -> HFTokenizer:
    """Any of our tokenizers as an HFTokenizer that encodes the same ids (see write_hf_tokenizer)."""
    if isinstance(tok, HFTokenizer):
        return tok
    if isinstance(tok, ByteTokenizer):
        return _byte_as_hf()
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece_as_hf(tok._proto, tok.identity)
    raise TypeError(f"as_hf_tokenizer: no conversion for {type(tok).__name__}")


def _byte_as_hf() -> HFTokenizer:
    """The byte tokenizer as byte-level BPE without merges: byte b -> its GPT-2 character -> id b + 3."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    specials = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab = {**specials, **{c: b + 3 for b, c in bytes_to_unicode().items()}}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = _bos_post_processor("<s>", BOS_ID)
    return HFTokenizer(tok.to_str(), BOS_ID, EOS_ID, PAD_ID)


def _bos_post_processor(bos: str, bos_id: int):
    """Adds `bos` before each text when special tokens are added, as our prompts and documents begin."""
    from tokenizers import processors

    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )


def _sentencepiece_as_hf(proto: bytes, identity: str) -> HFTokenizer:
    """A sentencepiece model trained by `train_sentencepiece` as a `tokenizers` BPE/Unigram model.

    The pieces' markers become the characters they stand for ("▁" -> " ", "↵" -> "\\n"), so no
    normalizer or pre-tokenizer is needed and a literal "▁"/"↵" in the text, found in no piece,
    falls back to its bytes as ours does. BPE merges are every split of a normal piece into two
    pieces, ranked by the piece's score as sentencepiece applies them. Unigram keeps the scores
    (byte pieces' lowered, see below); HF's Viterbi may break ties between equal-score segmentations
    differently from sentencepiece (rare: pieces in another order, same text). Control and unknown
    pieces are special tokens; the decoder turns byte pieces back into bytes.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as RustTokenizer

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    norm, spec = model.normalizer_spec, model.trainer_spec
    if (
        norm.name != "identity"
        or norm.add_dummy_prefix
        or norm.remove_extra_whitespaces
        or not spec.byte_fallback
    ):
        raise DataError(
            f"sentencepiece model {identity}: only models trained by train_sentencepiece (identity "
            "normalisation, no dummy prefix, byte fallback) convert to a Hugging Face tokenizer"
        )
    pieces = list(model.pieces)

    def text(p) -> str:
        if p.type in (_SP_CONTROL, _SP_UNKNOWN, _SP_BYTE):
            return p.piece
        return p.piece.replace(SPACE, " ").replace(NEWLINE, "\n")

    vocab = {text(p): i for i, p in enumerate(pieces)}
    if spec.model_type == spec.BPE:
        ranked = []  # (score, piece id, left id, right id, (left, right))
        for i, p in enumerate(pieces):
            if p.type != _SP_NORMAL:
                continue
            s = text(p)
            for k in range(1, len(s)):
                left, right = s[:k], s[k:]
                if left in vocab and right in vocab:
                    ranked.append((-p.score, i, vocab[left], vocab[right], (left, right)))
        ranked.sort(key=lambda r: r[:4])
        rust_model = models.BPE(
            vocab=vocab,
            merges=[r[4] for r in ranked],
            unk_token=pieces[spec.unk_id].piece,
            byte_fallback=True,
            fuse_unk=False,
        )
    elif spec.model_type == spec.UNIGRAM:
        # Sentencepiece never matches a byte piece's name in text ("<0x41>"); HF's lattice would, unless
        # it scores below any spelling of it by other pieces (unknown characters included).
        lowest = min(p.score for p in pieces if p.type == _SP_NORMAL)
        scores = [10 * lowest - 100 if p.type == _SP_BYTE else p.score for p in pieces]
        rust_model = models.Unigram(
            [(text(p), score) for p, score in zip(pieces, scores)], unk_id=spec.unk_id, byte_fallback=True
        )
    else:
        raise DataError(
            f"sentencepiece model {identity}: only bpe and unigram models convert to Hugging Face"
        )
    tok = RustTokenizer(rust_model)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in pieces
            if p.type in (_SP_CONTROL, _SP_UNKNOWN)
        ]
    )
    tok.add_tokens(
        [AddedToken(text(p), special=False, normalized=False) for p in pieces if p.type == _SP_USER_DEFINED]
    )
    tok.post_processor = _bos_post_processor(pieces[spec.bos_id].piece, spec.bos_id)
    return HFTokenizer(tok.to_str(), spec.bos_id, spec.eos_id, spec.pad_id)


def write_hf_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Writes `tok` as a Hugging Face tokenizer directory: tokenizer.json, tokenizer_config.json
    (PreTrainedTokenizerFast, bos/eos/pad tokens, the chat template if any) and
    special_tokens_map.json. `transformers.AutoTokenizer.from_pretrained(out_dir)` then encodes
    text to our ids with `add_special_tokens=False`, and with special tokens (`tok(text)`) to
    `bos_prefix(tok)` + those ids, as our prompts (see as_hf_tokenizer for the conversions)."""
    hf = as_hf_tokenizer(tok)
    os.makedirs(out_dir, exist_ok=True)
    special = {"bos_token": hf.bos_token, "eos_token": hf.eos_token, "pad_token": hf.pad_token}
    if hf.unk_token is not None:
        special["unk_token"] = hf.unk_token
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,
    }
    if hf.chat_template is not None:
        config["chat_template"] = hf.chat_template
    write_atomic(os.path.join(out_dir, "tokenizer.json"), hf.tokenizer_json)
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        write_atomic(os.path.join(out_dir, name), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
