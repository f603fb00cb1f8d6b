"""Data layer: tokenizers, the TFDS builders, packing and the deterministic batch order."""

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time

import ml_collections
import numpy as np
import pytest

from lm.data import pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.data.builders import BUILDERS
from lm.data.builders.text_files import split_text
from lm.errors import DataError

TRICKY = (
    "def f(x):\n\tif x:\n        return 'héllo wörld ✓ 日本語 🐍'\n\n\n    # two  spaces   here \n"
    "  leading and trailing  \r\nnumbers 1234567890 3.14159 0x1F\n▁ literal markers ↵ too\x00\n"
)


def _code_corpus() -> list[str]:
    """~300 KB of real Python (json, email, asyncio) plus digit-heavy lines."""
    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for package in ("json", "email", "asyncio"):
        for name in sorted(os.listdir(os.path.join(root, package)))[:12]:
            if name.endswith(".py"):
                with open(os.path.join(root, package, name), encoding="utf-8") as f:
                    texts.append(f.read())
    texts.append("".join(f"x = {n * 7919 % 100000}\n" for n in range(3000)))
    return texts


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "t.model"
    return tokenizer_lib.train_sentencepiece(_code_corpus(), path, vocab_size=800)


# --- tokenizers -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_round_trip_is_exact_and_token_bytes_add_up(kind, spm_tokenizer, tmp_path):
    tok = tokenizer_lib.ByteTokenizer() if kind == "byte" else spm_tokenizer
    for text in [TRICKY, "", "\n", "    ", "\n\n\t\t", "▁", "↵↵", "a▁b↵c\nd", TRICKY * 3]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.token_bytes()[ids].sum() == len(text.encode("utf-8"))
        assert all(i > tok.eos_id for i in ids) and max(ids, default=0) < tok.vocab_size
    assert tok.encode_batch([TRICKY, "", "x▁y"]) == [tok.encode(TRICKY), [], tok.encode("x▁y")]
    assert tok.token_bytes()[[tok.pad_id, tok.bos_id, tok.eos_id]].tolist() == [0, 0, 0]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    tok.save(tmp_path / "tok")
    loaded = tokenizer_lib.load_tokenizer(tmp_path / "tok")
    assert (type(loaded), loaded.vocab_size, loaded.identity) == (type(tok), tok.vocab_size, tok.identity)
    assert loaded.encode(TRICKY) == tok.encode(TRICKY)


def test_sentencepiece_compresses_code_and_decodes_control_ids_to_nothing(spm_tokenizer):
    tok = spm_tokenizer
    assert tok.vocab_size == 800
    code = "class A:\n    def f(self):\n        return self.x\n"
    assert len(code.encode()) / len(tok.encode(code)) > 3.0
    # Pieces span line breaks: a newline and the next line's indentation can be one token.
    assert any(re.fullmatch(r"\n {4,}\S*", tok.decode([i])) for i in range(tok.vocab_size))
    assert tok.decode([tok.bos_id] + tok.encode("a b") + [tok.eos_id, tok.pad_id]) == "a b"
    table = tok.token_bytes()
    assert table.shape == (800,) and table[3] == 0  # unk
    assert (table[4:260] == 1).all()  # the 256 byte-fallback pieces follow the control ids


def test_split_digits(spm_tokenizer, tmp_path):
    ids = spm_tokenizer.encode("year 20240917")
    assert [spm_tokenizer.decode([i]) for i in ids][-8:] == list("20240917")
    merged = tokenizer_lib.train_sentencepiece(_code_corpus(), tmp_path / "m.model", 800, split_digits=False)
    pieces = [merged.decode([i]) for i in range(merged.vocab_size)]
    assert any(re.search(r"\d\d", p) for p in pieces)
    assert not any(re.search(r"\d\d", spm_tokenizer.decode([i])) for i in range(spm_tokenizer.vocab_size))


def test_training_is_deterministic_and_too_large_vocab_is_a_data_error(spm_tokenizer, tmp_path):
    again = tokenizer_lib.train_sentencepiece(_code_corpus(), tmp_path / "again.model", vocab_size=800)
    assert again.identity == spm_tokenizer.identity
    with pytest.raises(DataError, match=r"^config\.tokenizer\.vocab_size=100000: .*Vocabulary size") as e:
        tokenizer_lib.train_sentencepiece(["tiny corpus\n"] * 10, tmp_path / "x.model", vocab_size=100_000)
    assert "\n" not in str(e.value)


# --- packing and batches ----------------------------------------------------------------------


def test_rows_of_a_hand_made_stream():
    #                  doc 1 -------  doc 2 ---  doc 3 -------
    stream = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 2], np.uint16)
    rows = pipeline.PackedRows(stream, seq_len=4)
    assert (rows.num_rows, rows.num_tokens) == (3, 11)
    b = rows.rows(np.arange(3))
    assert b["inputs"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 2, 0]]
    assert b["targets"].tolist() == [[5, 6, 2, 1], [7, 2, 1, 8], [9, 2, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 1, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 0]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 0, 0]]
    assert {k: v.dtype for k, v in b.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }
    # Every non-BOS token is a counted target exactly once.
    assert b["loss_mask"].sum() == (stream != 1).sum()
    with pytest.raises(IndexError):
        rows.rows(np.array([3]))


def _random_rows(num_docs=60, seq_len=16, seed=0) -> pipeline.PackedRows:
    rng = np.random.default_rng(seed)
    docs = [[1, *rng.integers(3, 50, rng.integers(1, 40)), 2] for _ in range(num_docs)]
    return pipeline.PackedRows(np.concatenate(docs).astype(np.uint16), seq_len)


def test_batch_at_step_is_a_pure_function_of_seed_and_step():
    rows = _random_rows()
    a = pipeline.batch_at_step(rows, step=5, global_batch_size=8, seed=3)
    b = pipeline.batch_at_step(rows, step=5, global_batch_size=8, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert a["inputs"].shape == (8, 16)
    assert not np.array_equal(a["inputs"], pipeline.batch_at_step(rows, 6, 8, seed=3)["inputs"])
    assert not np.array_equal(a["inputs"], pipeline.batch_at_step(rows, 5, 8, seed=4)["inputs"])
    parts = [pipeline.batch_at_step(rows, 5, 8, 3, process_index=p, process_count=4) for p in range(4)]
    assert all(p["inputs"].shape == (2, 16) for p in parts)
    for k in a:
        assert np.array_equal(np.concatenate([p[k] for p in parts]), a[k])
    with pytest.raises(ValueError):
        pipeline.batch_at_step(rows, 0, 6, 0, process_count=4)


def test_each_epoch_visits_every_row_once():
    rows = _random_rows()
    n, batch = rows.num_rows, 8
    steps = math.ceil(2 * n / batch)
    ids = np.concatenate([pipeline.global_row_ids(n, t, batch, seed=1) for t in range(steps)])
    assert sorted(ids[:n]) == list(range(n))
    assert sorted(ids[n : 2 * n]) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])  # a new order each epoch
    assert not np.array_equal(ids[:n], np.arange(n))


def test_eval_batches_cover_every_row_once_in_order():
    rows = _random_rows()
    n = rows.num_rows
    batches = list(pipeline.eval_batches(rows, batch_size=8, num_batches=0))
    assert len(batches) == math.ceil(n / 8)
    inputs = np.concatenate([b["inputs"] for b in batches])
    assert np.array_equal(inputs[:n], rows.rows(np.arange(n))["inputs"])
    tail = np.concatenate([b["loss_mask"] for b in batches])[n:]
    assert tail.shape[0] == len(batches) * 8 - n and not tail.any()
    assert len(list(pipeline.eval_batches(rows, 8, num_batches=2))) == 2
    split = [list(pipeline.eval_batches(rows, 8, 3, process_index=p, process_count=2)) for p in range(2)]
    whole = list(pipeline.eval_batches(rows, 8, 3))
    for k in range(3):
        assert np.array_equal(
            np.concatenate([split[0][k]["targets"], split[1][k]["targets"]]), whole[k]["targets"]
        )


def test_unigram_entropy():
    assert pipeline.unigram_entropy(np.array([3, 4, 5, 6] * 10), 8) == pytest.approx(math.log(4))
    rows = pipeline.PackedRows(np.array([1, 3, 3, 2, 1, 3, 2], np.uint16), seq_len=4)
    p = np.array([3, 2]) / 5  # BOS never a target: tokens 3 (x3) and EOS (x2)
    assert pipeline.unigram_entropy(rows, 8) == pytest.approx(-(p * np.log(p)).sum())


# --- the stdlib builder on a fake tree ---------------------------------------------------------


def _fake_stdlib(root, extra_files=()):
    """30 packages and 10 modules of different sizes, a `test` package of ~40%, site-packages."""

    def write(rel, data):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())

    for i in range(30):
        write(f"pkg{i:02d}/__init__.py", "")
        for j in range(1 + i % 3):
            write(f"pkg{i:02d}/m{j}.py", f"# pkg{i} m{j}\n" + "def f():\n    return 1\n" * (20 + 7 * i))
    for i in range(10):
        write(f"mod{i}.py", f"X = {i}\n" * (50 + 10 * i))
    for j in range(8):
        write(f"test/test_{j}.py", "import unittest\n" * 1500)
    write("site-packages/thirdparty.py", "third = 'party'\n")
    write("pkg03/__pycache__/m0.py", "cached = True\n")
    write("pkg05/latin1.py", "s = 'caf\xe9'\n".encode("latin-1"))
    for rel, text in extra_files:
        write(rel, text)


def _read_split(builder, split):
    source = builder.as_data_source(split=split)
    return {r["path"].decode(): r["text"].decode() for r in source.__getitems__(list(range(len(source))))}


def test_stdlib_builder_holds_out_whole_packages(tmp_path):
    root = tmp_path / "stdlib"
    _fake_stdlib(root)
    builder = BUILDERS["stdlib"](root=str(root), data_dir=str(tmp_path / "data"), file_format="array_record")
    builder.download_and_prepare()
    train, held = _read_split(builder, "train"), _read_split(builder, "validation")
    top = lambda paths: {p.split("/")[0].removesuffix(".py") for p in paths}  # noqa: E731
    assert held and not top(train) & top(held)
    assert "test" in top(train)
    assert not any(
        "site-packages" in p or "__pycache__" in p or "latin1" in p or p.endswith("__init__.py")
        for p in {*train, *held}
    )  # third-party, cache, non-UTF-8 and empty files are skipped
    assert len(train) + len(held) == 30 + sum(1 + i % 3 for i in range(30)) - 30 + 10 + 8
    held_bytes = sum(len(t) for t in held.values())
    assert 0.05 <= held_bytes / (held_bytes + sum(len(t) for t in train.values())) < 0.09
    assert train["mod3.py"] == "X = 3\n" * 80
    meta = builder.info.metadata
    assert meta["python_version"] == platform.python_version()
    assert re.fullmatch(r"[0-9a-f]{64}", meta["file_list_sha256"])
    assert builder.builder_config.name.startswith(
        f"py{platform.python_version()}-{meta['file_list_sha256'][:12]}"
    )
    # Same tree -> same config; one more file -> a different one (no collision in the data dir).
    same = BUILDERS["stdlib"](root=str(root), data_dir=str(tmp_path / "data"))
    assert same.builder_config.name == builder.builder_config.name and same.is_prepared()
    _fake_stdlib(root, extra_files=[("pkg00/new.py", "new = 1\n")])
    assert (
        BUILDERS["stdlib"](root=str(root), data_dir=str(tmp_path / "data")).builder_config.name
        != same.builder_config.name
    )


# --- text_files, prepare_data and DataErrors ----------------------------------------------------

BOOK = "".join(
    f"Chapter {c}.\n\n"
    + "".join(f"Paragraph {c}.{p}: the quick brown fox\njumps over the lazy dog.\n\n" for p in range(12))
    for c in range(10)
)


def _text_files(tmp_path):
    (tmp_path / "book.txt").write_text(BOOK)
    lines = [json.dumps({"text": f"record {i}\n  indented ✓", "id": i}) for i in range(20)]
    (tmp_path / "recs.jsonl").write_text("\n".join(lines) + "\n\n")
    return {
        "source": "text_files",
        "files": f"{tmp_path}/*.txt, {tmp_path}/recs.jsonl",
        "data_dir": str(tmp_path / "data"),
    }


def test_split_text_cuts_at_blank_lines_and_keeps_every_line():
    chunks = split_text(BOOK, 256)
    assert len(chunks) > 10 and all(c.strip() and not c.startswith("\n") for c in chunks)
    assert all(len(c) < 2 * 256 + 80 for c in chunks)
    lines = [line for line in BOOK.split("\n") if line]
    assert [line for c in chunks for line in c.split("\n") if line] == lines
    # Without blank lines a chunk ends at the first line end past 2 * chunk_chars.
    assert split_text("one\ntwo\nthree\nfour\nfive\n", 8) == ["one\ntwo\nthree\nfour", "five"]


def test_text_files_with_byte_tokenizer(tmp_path):
    cfg = _text_files(tmp_path)
    data = pipeline.prepare_data(
        ml_collections.ConfigDict(cfg), ml_collections.ConfigDict({"kind": "byte"}), seq_len=32
    )
    splits = data.info["splits"]
    assert splits["eval"]["split"] == "validation"
    assert splits["train"]["num_docs"] + splits["eval"]["num_docs"] >= 20 + 10
    assert splits["train"]["num_bytes"] + splits["eval"]["num_bytes"] == (
        sum(len(f"record {i}\n  indented ✓".encode()) for i in range(20))
        + sum(len(c.encode()) for c in split_text(BOOK, len(BOOK) // 20))
    )
    assert (
        0.02
        < splits["eval"]["num_bytes"] / (splits["train"]["num_bytes"] + splits["eval"]["num_bytes"])
        < 0.15
    )
    assert splits["train"]["bytes_per_token"] == 1.0 and data.info["tokenizer"]["path"] is None
    assert (
        data.train.num_tokens
        == splits["train"]["num_tokens"]
        == splits["train"]["num_bytes"] + 2 * splits["train"]["num_docs"]
    )
    assert data.train.num_rows == math.ceil((data.train.num_tokens - 1) / 32)
    json.dumps(data.info)
    corpus = pipeline.open_corpus(cfg, cfg["data_dir"])
    docs = [*corpus.texts("train"), *corpus.texts("validation")]
    assert sorted(d for d in docs if d.startswith("record")) == sorted(
        f"record {i}\n  indented ✓" for i in range(20)
    )
    stream = np.concatenate([data.train.tokens, data.eval.tokens])
    assert data.tokenizer.decode(stream).count("record") == 20
    # Cached: a second call reuses the streams; editing a file gives a new dataset config.
    again = pipeline.prepare_data(cfg, {"kind": "byte"}, seq_len=32)
    assert again.info == data.info
    time.sleep(0.01)
    (tmp_path / "book.txt").write_text(BOOK + "\nEpilogue.\n")
    assert pipeline.prepare_data(cfg, {"kind": "byte"}, seq_len=32).info["config"] != data.info["config"]


def test_prepare_data_trains_caches_and_loads_a_sentencepiece_model(tmp_path):
    cfg = _text_files(tmp_path)
    tok_cfg = {
        "kind": "sentencepiece",
        "vocab_size": 400,
        "model_type": "bpe",
        "split_digits": True,
        "path": "",
    }
    data = pipeline.prepare_data(cfg, tok_cfg, seq_len=64)
    path = data.info["tokenizer"]["path"]
    assert path.startswith(cfg["data_dir"]) and os.path.exists(path)
    assert data.tokenizer.vocab_size == 400 and data.info["bytes_per_token"] > 2.0
    assert data.tokenizer.decode(data.eval.tokens).count("\x00") == 0
    loaded = pipeline.prepare_data(cfg, {**tok_cfg, "path": path}, seq_len=64)
    assert loaded.tokenizer.identity == data.tokenizer.identity
    assert np.array_equal(loaded.train.tokens, data.train.tokens)
    h = pipeline.unigram_entropy(data.eval, data.tokenizer.vocab_size)
    assert 1.0 < h < math.log(400)


# A process preparing text_files with the byte tokenizer, printing its train split's token count.
_PREPARE = (
    "import json, sys; from lm.data import pipeline; "
    "d = pipeline.prepare_data(json.loads(sys.argv[1]), {'kind': 'byte'}, 16); print(d.train.num_tokens)"
)


def test_parallel_prepare_data_processes_agree(tmp_path):
    cfg = _text_files(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE, json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate()[0].strip().splitlines()[-1] for p in procs]  # after 'preparing data ...'
    assert all(p.returncode == 0 for p in procs) and len(set(outputs)) == 1 and outputs[0].isdigit()


def test_first_run_prints_one_line_of_ours_and_no_library_noise(tmp_path):
    cfg = _text_files(tmp_path)
    runs = [
        subprocess.run(
            [sys.executable, "-c", _PREPARE, json.dumps(cfg)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": ""},
        )
        for _ in range(2)
    ]
    assert all(r.returncode == 0 and r.stderr == "" for r in runs), [r.stderr for r in runs]
    first, again = (r.stdout.splitlines() for r in runs)
    note = rf"preparing data text_files \(first run only; cached in {re.escape(cfg['data_dir'])}\) \.\.\. "
    assert re.fullmatch(note + r"done in \d+ s", first[0]), first
    assert len(first) == 2 and again == first[1:]  # cached: nothing but the program's own output


def test_quiet_libraries_drops_only_tfds_records_below_error():
    import logging

    from absl import logging as absl_logging

    from lm.quiet import quiet_libraries

    quiet_libraries()
    quiet_libraries()  # idempotent
    logger = absl_logging.get_absl_logger()
    tfds_file = os.path.join("site-packages", "tensorflow_datasets", "core", "dataset_builder.py")

    def passes(level, path):
        return logger.filter(logging.LogRecord("absl", level, path, 1, "message", None, None))

    assert not passes(logging.WARNING, tfds_file) and passes(logging.ERROR, tfds_file)
    assert passes(logging.WARNING, os.path.join("site-packages", "orbax", "checkpoint", "x.py"))
    assert len([f for f in logger.filters if type(f).__name__ == "_DropTfdsChatter"]) == 1


def _error(data_cfg, tokenizer_cfg=None) -> str:
    with pytest.raises(DataError) as e:
        pipeline.prepare_data(data_cfg, tokenizer_cfg or {"kind": "byte"}, seq_len=16)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_data_errors_are_one_line_and_name_the_key_or_file(tmp_path):
    d = str(tmp_path / "data")
    files = lambda pattern: {"source": "text_files", "files": pattern, "data_dir": d}  # noqa: E731
    assert _error(files("/nonexistent/*.txt")) == "config.data.files: no file matches '/nonexistent/*.txt'"
    assert _error(files("")).startswith("config.data.files is empty")
    (tmp_path / "empty.txt").write_text("\n \n")
    assert (
        _error(files(str(tmp_path / "empty.txt")))
        == f"config.data.files: {tmp_path}/empty.txt is empty (no documents)"
    )
    (tmp_path / "bad.txt").write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    assert (
        _error(files(str(tmp_path / "bad.txt")))
        == f"config.data.files: {tmp_path}/bad.txt line 3 is not valid UTF-8"
    )
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    assert (
        _error(files(str(tmp_path / "bad.jsonl")))
        == f"config.data.files: {tmp_path}/bad.jsonl:2 is not valid JSON"
    )
    (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    assert _error(files(str(tmp_path / "nofield.jsonl"))) == (
        f"config.data.files: {tmp_path}/nofield.jsonl:3 has no string field 'text' (config.data.text_field)"
    )
    (tmp_path / "data.csv").write_text("a,b\n")
    assert (
        _error(files(str(tmp_path / "data.csv")))
        == f"config.data.files: {tmp_path}/data.csv is not a .txt or .jsonl file"
    )
    (tmp_path / "one.txt").write_text("just one line")
    assert "need 2 or more" in _error(files(str(tmp_path / "one.txt")))
    message = _error({"source": "wikipedia", "data_dir": d})
    assert message.startswith("config.data.source: unknown source 'wikipedia'") and "'stdlib'" in message
    assert _error({"source": "tfds:no_such_dataset_xyz", "data_dir": d}).startswith(
        "config.data.source: no TFDS dataset named 'no_such_dataset_xyz'"
    )
    (tmp_path / "ok.txt").write_text(BOOK)
    assert _error(files(str(tmp_path / "ok.txt")), {"kind": "words"}).startswith(
        "config.tokenizer.kind: unknown kind 'words'"
    )
    assert _error(
        files(str(tmp_path / "ok.txt")), {"kind": "sentencepiece", "path": str(tmp_path / "none.model")}
    ) == (f"config.tokenizer.path: no such file '{tmp_path}/none.model'")


# --- the real stdlib corpus (slow: about 30 s of preparation on 2 cores) -----------------------


@pytest.mark.slow
def test_stdlib_corpus_end_to_end(tmp_path):
    data = pipeline.prepare_data(
        {"source": "stdlib", "data_dir": str(tmp_path)}, {"vocab_size": 4096}, seq_len=256
    )
    info = data.info
    assert info["python_version"] == platform.python_version() and "test" not in info["heldout_packages"]
    assert (
        0.05
        <= info["splits"]["eval"]["num_bytes"]
        / (info["splits"]["train"]["num_bytes"] + info["splits"]["eval"]["num_bytes"])
        < 0.15
    )
    assert info["bytes_per_token"] > 3.5
    corpus = pipeline.open_corpus({"source": "stdlib"}, str(tmp_path))
    texts = list(corpus.texts("validation"))
    assert all(data.tokenizer.decode(ids) == t for ids, t in zip(data.tokenizer.encode_batch(texts), texts))
    assert (
        hashlib.sha256(open(info["tokenizer"]["path"], "rb").read()).hexdigest()[:16]
        == data.tokenizer.identity
    )
