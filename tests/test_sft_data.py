"""SFT data: graded tasks and their graders, the instruction builders, packing with a response-only loss."""

import json
import os

import numpy as np
import pytest

from lm.data import graded_tasks, pipeline, sft
from lm.data.builders import BUILDERS
from lm.data.tokenizer import ByteTokenizer
from lm.errors import DataError

HH_FILE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "hh_rlhf_harmless_base_test.jsonl"
)
ALL_TASKS = "sort,add,reverse,constrained_line"


# --- graded tasks -----------------------------------------------------------------------------


def _grade(task, meta, response):
    g = graded_tasks.grade(task, meta, response)
    return g["score"], g["exact"]


def test_ideal_responses_score_one_and_are_exact():
    examples = graded_tasks.make_examples(ALL_TASKS, 400, seed=0, split="train")
    assert [e["task"] for e in examples[:5]] == ["sort", "add", "reverse", "constrained_line", "sort"]
    assert all(_grade(e["task"], e["meta"], e["response"]) == (1.0, True) for e in examples)
    assert graded_tasks.grade_batch(examples, [e["response"] for e in examples]) == {
        "score": 1.0,
        "exact": 1.0,
        **{f"{k}_{t}": 1.0 for t in ALL_TASKS.split(",") for k in ("score", "exact")},
    }


def test_copying_the_prompt_or_answering_nothing_scores_low():
    examples = graded_tasks.make_examples("sort,add,reverse", 600, seed=0, split="train")
    copies = {
        "prompt": [e["prompt"] for e in examples],
        "operands": [e["prompt"].split(": ", 1)[1] for e in examples],  # "42 7 93", "417 + 385", "planet"
        "empty": [""] * len(examples),
    }
    for name, responses in copies.items():
        result = graded_tasks.grade_batch(examples, responses)
        assert result["exact"] == 0.0, name
        for task in ("sort", "add", "reverse"):
            assert result[f"score_{task}"] <= 0.2, (name, task, result)
    assert graded_tasks.grade_batch(examples, copies["empty"])["score"] == 0.0


def test_partial_credit_is_positional():
    sort_meta = {"numbers": [42, 7, 93, 15, 60]}
    assert _grade("sort", sort_meta, "7 15 42 60 93") == (1.0, True)
    assert _grade("sort", sort_meta, "  7  15 42\n60 93 ") == (1.0, True)
    assert _grade("sort", sort_meta, "7 15 42 93 60") == (0.6, False)
    assert _grade("sort", sort_meta, "7 15 42 60 93 99") == (pytest.approx(5 / 6), False)
    assert _grade("sort", sort_meta, "42 7 93 15 60") == (0.0, False)
    add_meta = json.dumps({"a": 617, "b": 617})  # 1234
    assert _grade("add", add_meta, " 1234\n") == (1.0, True)
    assert _grade("add", add_meta, "1200") == (0.5, False)
    assert _grade("add", add_meta, "234") == (0.75, False)  # aligned at the units
    assert _grade("add", add_meta, "617 + 617") == (0.0, False)
    assert _grade("reverse", {"word": "planet"}, "t e n a l p") == (1.0, True)
    assert _grade("reverse", {"word": "planet"}, "tenalp") == (1.0, True)
    assert _grade("reverse", {"word": "planet"}, "t e n x y z") == (0.5, False)
    assert _grade("reverse", {"word": "planet"}, "p l a n e t") == (0.0, False)


def test_constrained_line_scores_the_fraction_of_constraints_met():
    meta = {
        "min_words": 6,
        "max_words": 10,
        "include": ["river", "light"],
        "avoid": ["dark"],
        "rhyme": "night",
    }
    assert _grade("constrained_line", meta, "The river carries light into the white") == (1.0, True)
    assert _grade("constrained_line", meta, "Light on the river: a kite takes flight!") == (1.0, True)
    assert _grade("constrained_line", meta, "the dark river and the light of the white") == (0.8, False)
    assert _grade("constrained_line", meta, "the river runs into the night") == (
        0.6,
        False,
    )  # light, rhyme missed
    assert _grade("constrained_line", meta, "river light bright") == (0.8, False)  # too short
    assert _grade("constrained_line", meta, "") == (0.0, False)
    assert _grade("constrained_line", meta, " 123 ") == (0.0, False)


def test_train_and_validation_prompts_are_disjoint_and_deterministic():
    train = {seed: graded_tasks.make_examples(ALL_TASKS, 800, seed, "train") for seed in (0, 1)}
    held = {seed: graded_tasks.make_examples(ALL_TASKS, 200, seed, "validation") for seed in (0, 1)}
    prompts = lambda examples: {e["prompt"] for e in examples}  # noqa: E731
    for a in (0, 1):
        assert len(prompts(train[a])) == 800 and len(prompts(held[a])) == 200  # distinct within a split
        for b in (0, 1):
            assert not prompts(train[a]) & prompts(held[b])
    assert graded_tasks.make_examples(ALL_TASKS, 800, 0, "train") == train[0]
    assert prompts(train[0]) != prompts(train[1])
    assert all(graded_tasks.split_of(e["prompt"]) == "validation" for e in held[0])
    with pytest.raises(DataError, match=r"^config\.data\.tasks: 'multiply'; expected"):
        graded_tasks.make_examples("sort,multiply", 10, 0, "train")


# --- builders -----------------------------------------------------------------------------------


def _records(n):
    return [
        {"instruction": f"Say {i}.", "input": "loudly" if i % 3 == 0 else "", "output": f"{i}!"}
        for i in range(n)
    ]


def _build(name, tmp_path, **kwargs):
    builder = BUILDERS[name](data_dir=str(tmp_path / "data"), file_format="array_record", **kwargs)
    builder.download_and_prepare()
    return builder


def _read(builder, split):
    return sft.read_examples(builder, split)


def test_alpaca_builder_round_trip(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(_records(20), indent=1))
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(
            "\n".join(json.dumps({**r, "instruction": "B " + r["instruction"]}) for r in _records(10))
            + "\n\n"
        )
    builder = _build("alpaca", tmp_path, files=f"{tmp_path}/a.json,{tmp_path}/b.jsonl", eval_fraction=0.2)
    train, held = _read(builder, "train"), _read(builder, "validation")
    assert len(train) + len(held) == 30 and len(held) == 6
    assert not {e["prompt"] for e in train} & {e["prompt"] for e in held}
    by_record = {e["record"]: e for e in train + held}
    assert by_record[f"{tmp_path}/a.json[3]"] == {
        "task": "alpaca",
        "meta": "{}",
        "prompt": "Say 3.\n\nloudly",
        "response": "3!",
        "record": f"{tmp_path}/a.json[3]",
    }
    assert by_record[f"{tmp_path}/b.jsonl:2"]["prompt"] == "B Say 1."
    assert builder.info.metadata["records"] == {
        "num_records": 30,
        "num_skipped": 0,
        "skipped_reasons": {},
        "skipped_records": [],
    }


BAD = {  # file name, contents -> the DataError after "config.data.files: <tmp>/"
    "missing.jsonl": (
        b'{"instruction": "a", "output": "b"}\n{"instruction": "x", "input": ""}\n',
        "missing.jsonl:2 has no field 'output'",
    ),
    "type.json": (
        b'[{"instruction": "a", "output": "b"}, {"instruction": "x", "input": 5, "output": "y"}]',
        "type.json[1] field 'input' is a JSON number, not a string",
    ),
    "latin1.jsonl": (
        b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xe9", "output": "y"}\n',
        "latin1.jsonl:3 is not valid UTF-8",
    ),
    "empty.jsonl": (
        b'{"instruction": "a", "output": "  "}\n{"instruction": "b", "output": "c"}\n',
        "empty.jsonl:1 field 'output' is empty",
    ),
    "syntax.jsonl": (
        b'{"instruction": "a", "output": "b"}\n{"instruction": oops}\n',
        "syntax.jsonl:2 is not valid JSON",
    ),
    "list.json": (
        b'[{"instruction": "a", "output": "b"}, ["a", "b"]]',
        "list.json[1] is a JSON array, not an object",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_record_stops_the_build_with_one_line_naming_it(name, tmp_path):
    data, message = BAD[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as e:
        _build("alpaca", tmp_path, files=str(tmp_path / name))
    assert str(e.value) == (
        f"config.data.files: {tmp_path}/{message} (config.data.skip_bad_records=True skips such records)"
    )


def test_skip_bad_records_counts_them(tmp_path):
    for name, (data, _) in BAD.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "good.json").write_text(json.dumps(_records(8)))
    builder = _build("alpaca", tmp_path, files=f"{tmp_path}/*.json*", skip_bad_records=True)
    summary = builder.info.metadata["records"]
    assert (summary["num_records"], summary["num_skipped"]) == (8 + 2 * len(BAD), len(BAD))
    assert summary["skipped_reasons"] == {
        "has no field 'output'": 1,
        "field 'input' is a JSON number, not a string": 1,
        "is not valid UTF-8": 1,
        "field 'output' is empty": 1,
        "is not valid JSON": 1,
        "is a JSON array, not an object": 1,
    }
    assert f"{tmp_path}/latin1.jsonl:3 is not valid UTF-8" in summary["skipped_records"]
    assert len(_read(builder, "train")) + len(_read(builder, "validation")) == 8 + len(BAD)


def test_unreadable_files_stop_the_build_even_when_skipping(tmp_path):
    (tmp_path / "broken.json").write_text('[{"instruction": "a", "output": "b"},\n oops]')
    (tmp_path / "object.json").write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON \(line 2: Expecting value\)$"):
        _build("alpaca", tmp_path, files=str(tmp_path / "broken.json"), skip_bad_records=True)
    with pytest.raises(DataError, match=r"object\.json is not a JSON array of records$"):
        _build("alpaca", tmp_path, files=str(tmp_path / "object.json"), skip_bad_records=True)
    with pytest.raises(DataError, match=r"\.txt is not a \.json or \.jsonl file$"):
        (tmp_path / "notes.txt").write_text("hi")
        _build("alpaca", tmp_path, files=str(tmp_path / "notes.txt"))


def test_hh_builder_on_a_made_up_file(tmp_path):
    turn = "\n\nHuman: Hi {0}\n\nAssistant: Hello.\n\nHuman: And?\n\nAssistant:"
    rows = [
        {"chosen": turn.format(i) + f" Good {i}. ", "rejected": turn.format(i) + " Bad."} for i in range(6)
    ]
    rows.append({"chosen": "\n\nHuman: no assistant turn", "rejected": "x"})
    (tmp_path / "hh.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(DataError, match=r"hh\.jsonl:7 field 'chosen' has no '\\n\\nAssistant:' turn \("):
        _build("hh", tmp_path, files=str(tmp_path / "hh.jsonl"))
    builder = _build(
        "hh", tmp_path, files=str(tmp_path / "hh.jsonl"), skip_bad_records=True, eval_fraction=0.3
    )
    examples = {
        e["record"].rsplit(":", 1)[1]: e for e in _read(builder, "train") + _read(builder, "validation")
    }
    assert sorted(examples, key=int) == ["1", "2", "3", "4", "5", "6"]
    assert examples["3"] == {
        "task": "hh",
        "meta": "{}",
        "prompt": turn.format(2),
        "response": "Good 2.",
        "chosen": "Good 2.",
        "rejected": "Bad.",
        "preference": True,
        "record": f"{tmp_path}/hh.jsonl:3",
    }


@pytest.fixture(scope="module")
def hh_builder(tmp_path_factory):
    if not os.path.exists(HH_FILE):
        pytest.skip(f"{HH_FILE} is absent")
    return _build("hh", tmp_path_factory.mktemp("hh"), files=HH_FILE)


def test_hh_real_file_irregular_pairs(hh_builder):
    meta = hh_builder.info.metadata
    assert meta["records"]["num_records"] == 2312 and meta["records"]["num_skipped"] == 0
    assert meta["hh"] == {
        "prompt_mismatch": 5,
        "empty_chosen_response": 4,
        "empty_rejected_response": 0,
        "num_sft_examples": 2308,
        "num_preference_pairs": 2303,
    }
    examples = _read(hh_builder, "train") + _read(hh_builder, "validation")
    assert len(examples) == 2308 and 100 <= len(_read(hh_builder, "validation")) <= 130
    line = {int(e["record"].rsplit(":", 1)[1]): e for e in examples}
    assert not {87, 517, 926, 1104} & set(line)  # empty chosen responses are dropped
    mismatched = [n for n, e in line.items() if not e["preference"]]
    assert sorted(mismatched) == [1255, 1689, 1951, 1953, 2037]
    assert all(line[n]["rejected"] == "" and line[n]["response"] for n in mismatched)
    with open(HH_FILE) as f:
        raw = {n: json.loads(text) for n, text in enumerate(f, start=1)}
    for n, e in line.items():
        assert e["prompt"].startswith("\n\nHuman:") and e["prompt"].endswith("\n\nAssistant:")
        assert (
            raw[n]["chosen"].startswith(e["prompt"])
            and raw[n]["chosen"][len(e["prompt"]) :].strip() == e["response"]
        )
        assert e["response"] == e["chosen"] and e["response"] == e["response"].strip()
    assert sum(e["prompt"].count("\n\nHuman:") > 1 for e in examples) == 1649  # multi-turn, kept verbatim


# --- SFT packing --------------------------------------------------------------------------------

TEMPLATE = {"user": "", "assistant": ">"}


def test_packing_by_hand():
    tok = ByteTokenizer()  # id = byte + 3: 'a' = 100, ..., 'h' = 107, '>' = 65
    examples = [
        {"prompt": "ab", "response": "c"},
        {"prompt": "d", "response": "ef"},
        {"prompt": "g", "response": "h"},
    ]
    tokens, prompt_lengths = sft.tokenize_examples(tok, TEMPLATE, examples)
    assert tokens == [[1, 100, 101, 65, 102, 2], [1, 103, 65, 104, 105, 2], [1, 106, 65, 107, 2]]
    assert prompt_lengths == [4, 3, 3]
    assert sft.encode_prompt(tok, TEMPLATE, "ab") == tokens[0][:4]
    rows = sft.pack_examples(tokens, prompt_lengths, seq_len=11, bos_id=1, pad_id=0)
    assert rows.num_rows == 2  # 6 + 6 tokens fill row 0 exactly (12 = seq_len + 1)
    b = rows.rows(np.arange(2))
    assert b["inputs"].tolist() == [
        [1, 100, 101, 65, 102, 2, 1, 103, 65, 104, 105],
        [1, 106, 65, 107, 2, 0, 0, 0, 0, 0, 0],
    ]
    assert b["targets"].tolist() == [
        [100, 101, 65, 102, 2, 1, 103, 65, 104, 105, 2],
        [106, 65, 107, 2, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert b["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0]]
    assert {k: v.dtype for k, v in b.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "segment_ids": np.int32,
        "positions": np.int32,
        "loss_mask": np.float32,
    }
    assert sft.greedy_rows([6, 6, 5], 11).tolist() == [0, 1, 3]
    assert sft.greedy_rows([6, 6, 5], 12).tolist() == [0, 2, 3]
    assert sft.greedy_rows([5, 6, 1, 12, 1], 12).tolist() == [0, 3, 4, 5]
    assert sft.format_prompt({}, "Hi") == "User: Hi\nAssistant: "
    with pytest.raises(IndexError):
        rows.rows(np.array([2]))


def _segments(row):
    """[(example tokens, loss_mask of its inputs)] of one row. An example's tokens are its segment's
    inputs, plus its last target when that is the closing EOS (the row is full)."""
    out = []
    for s in range(1, row["segment_ids"].max() + 1):
        where = np.flatnonzero(row["segment_ids"] == s)
        tokens = row["inputs"][where].tolist()
        if tokens[-1] != 2:
            tokens.append(int(row["targets"][where[-1]]))
        out.append((tokens, row["loss_mask"][where].tolist()))
    return out


def test_prepare_sft_data_masks_exactly_the_responses_and_never_splits_an_example(tmp_path):
    tok = ByteTokenizer()
    cfg = {
        "source": "graded_tasks",
        "tasks": ALL_TASKS,
        "num_train": 300,
        "num_eval": 40,
        "data_dir": str(tmp_path),
    }
    data = sft.prepare_sft_data(cfg, TEMPLATE, tok, seq_len=200)
    builder = sft.open_sft_dataset(cfg, str(tmp_path))
    stored = sft.read_examples(builder, "train")
    batch = data.train.rows(np.arange(data.train.num_rows))
    found = [
        seg for r in range(data.train.num_rows) for seg in _segments({k: v[r] for k, v in batch.items()})
    ]
    assert len(found) == len(stored) == 300  # every example whole, once, in stored order
    for (tokens, mask), example in zip(found, stored):
        prompt, response = tok.encode(example["prompt"] + ">"), tok.encode(example["response"])
        assert tokens == [1, *prompt, *response, 2]
        # Input i predicts example token i + 1: a loss exactly on the response and the EOS, and
        # none on the next example's BOS or padding when the example ends inside the row.
        assert mask == [float(1 + len(prompt) <= i + 1 < len(tokens)) for i in range(len(mask))]
    assert (batch["positions"][batch["segment_ids"] == 0] == 0).all()
    assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()
    assert (batch["inputs"][:, 0] == 1).all()
    info = data.info["splits"]["train"]
    assert info["num_examples"] == 300 and info["num_rows"] == data.train.num_rows
    assert info["num_loss_tokens"] == batch["loss_mask"].sum() == sum(len(e["response"]) + 1 for e in stored)
    assert info["loss_fraction"] == pytest.approx(info["num_loss_tokens"] / (data.train.num_rows * 200))
    assert [e["prompt"] for e in data.eval_examples] == [
        e["prompt"] for e in sft.read_examples(builder, "validation")
    ]
    assert not {e["prompt"] for e in data.eval_examples} & {e["prompt"] for e in stored}
    assert (
        graded_tasks.grade_batch(data.eval_examples, [e["response"] for e in data.eval_examples])["exact"]
        == 1.0
    )
    json.dumps(data.info)
    # The training loop's readers work unchanged.
    step = pipeline.batch_at_step(data.train, step=3, global_batch_size=8, seed=0)
    assert step["inputs"].shape == (8, 200) and step["loss_mask"].dtype == np.float32
    evals = list(pipeline.eval_batches(data.eval, batch_size=4, num_batches=0))
    assert sum(b["loss_mask"].sum() for b in evals) == data.info["splits"]["eval"]["num_loss_tokens"]


def test_too_long_examples_stop_or_are_skipped(tmp_path):
    records = _records(12) + [{"instruction": "Long " * 30, "input": "", "output": "x"}]
    (tmp_path / "a.json").write_text(json.dumps(records))
    cfg = {
        "source": "alpaca",
        "files": str(tmp_path / "a.json"),
        "eval_fraction": 0.2,
        "data_dir": str(tmp_path / "d"),
    }
    with pytest.raises(DataError) as e:
        sft.prepare_sft_data(cfg, {}, ByteTokenizer(), seq_len=64)
    assert str(e.value) == (
        f"config.train.seq_len=64: example {tmp_path}/a.json[12] has 171 tokens with the template, "
        "more than seq_len + 1 (config.data.skip_bad_records=True skips it)"
    )
    data = sft.prepare_sft_data({**cfg, "skip_bad_records": True}, {}, ByteTokenizer(), seq_len=64)
    skipped = {split: data.info["splits"][split]["num_skipped_too_long"] for split in ("train", "eval")}
    assert sum(skipped.values()) == 1
    listed = [r for s in skipped for r in data.info["splits"][s]["too_long_records"]]
    assert listed == [f"{tmp_path}/a.json[12] (171 tokens)"]
    assert data.info["splits"]["train"]["num_examples"] + data.info["splits"]["eval"]["num_examples"] == 12
    assert data.info["build"]["records"]["num_records"] == 13
    with pytest.raises(DataError, match=r"^config\.data\.source: unknown SFT source 'stdlib'"):
        sft.prepare_sft_data({"source": "stdlib", "data_dir": str(tmp_path / "d")}, {}, ByteTokenizer(), 64)
