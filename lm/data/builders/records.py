"""Records of instruction data files (.json arrays or .jsonl), validated one by one.

A record is named by its location: 'file:line' (1-based) in a .jsonl file, 'file[index]'
(0-based) in a .json array. A bad record (not valid JSON or UTF-8, a missing field, a wrong type,
an empty required text) stops the build with one DataError line naming it and what is wrong, or,
with skip_bad_records, is skipped and counted in the build summary. Damage that hides the records
themselves (a .json file that does not parse, or is not an array) always stops the build.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from collections.abc import Callable

from lm.data.builders.stdlib_source import heldout_units
from lm.errors import DataError

_KEY = "config.data.files"
EXTENSIONS = (".json", ".jsonl")
MAX_LISTED = 20  # skipped records named in the build summary (all are counted)
_SURROGATE = re.compile("[\ud800-\udfff]")  # what undecodable bytes become under surrogateescape


class BadRecord(Exception):
    """What is wrong with one record, as a phrase: "has no field 'output'"."""


def read_records(path: str) -> list[tuple[str, object]]:
    """[(location, parsed record)] of one file; a record that cannot be parsed is a BadRecord."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    records = _jsonl_records(text, path) if path.endswith(".jsonl") else _json_array_records(text, path)
    if not records:
        raise DataError(f"{_KEY}: {path} is empty (no records)")
    return records


def _jsonl_records(text: str, path: str) -> list[tuple[str, object]]:
    """One record per non-blank line."""
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            records.append((f"{path}:{number}", _parse_line(line)))
    return records


def _parse_line(line: str) -> object:
    """A JSON value, or a BadRecord saying why the line is none."""
    try:
        return _check_utf8(json.loads(line))
    except json.JSONDecodeError:
        return BadRecord("is not valid UTF-8" if _SURROGATE.search(line) else "is not valid JSON")


def _json_array_records(text: str, path: str) -> list[tuple[str, object]]:
    """One record per element of the file's top-level array."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{_KEY}: {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, list):
        raise DataError(f"{_KEY}: {path} is not a JSON array of records")
    return [(f"{path}[{index}]", _check_utf8(record)) for index, record in enumerate(value)]


def _check_utf8(record: object) -> object:
    """The record, or a BadRecord when one of its strings holds undecodable bytes or lone surrogates."""
    if _SURROGATE.search(json.dumps(record, ensure_ascii=False)):
        return BadRecord("is not valid UTF-8")
    return record


def text_field(record: object, name: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """record[name], a string; '' for an absent optional field; BadRecord otherwise."""
    if not isinstance(record, dict):
        raise BadRecord(f"is a JSON {_json_type(record)}, not an object")
    if name not in record:
        if required:
            raise BadRecord(f"has no field {name!r}")
        return ""
    value = record[name]
    if not isinstance(value, str):
        raise BadRecord(f"field {name!r} is a JSON {_json_type(value)}, not a string")
    if not allow_empty and not value.strip():
        raise BadRecord(f"field {name!r} is empty")
    return value


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type."""
    names = {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def collect(
    paths: list[str], to_example: Callable[[object], dict], skip_bad_records: bool
) -> tuple[list[tuple[str, dict]], dict]:
    """[(location, example)] of every good record of `paths`, and the summary of those skipped.

    to_example: record -> example dict, raising BadRecord. Summary: num_records, num_skipped,
    skipped_reasons {reason: count}, skipped_records ['location reason', first MAX_LISTED].
    """
    examples, skipped = [], []
    num_records = 0
    for path in paths:
        for location, record in read_records(path):
            num_records += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                examples.append((location, to_example(record)))
            except BadRecord as e:
                if not skip_bad_records:
                    raise DataError(
                        f"{_KEY}: {location} {e} (config.data.skip_bad_records=True skips such records)"
                    ) from None
                skipped.append((location, str(e)))
    if not examples:
        raise DataError(f"{_KEY}: no usable records in {len(paths)} file(s) ({len(skipped)} skipped as bad)")
    summary = {
        "num_records": num_records,
        "num_skipped": len(skipped),
        "skipped_reasons": dict(collections.Counter(reason for _, reason in skipped)),
        "skipped_records": [f"{location} {reason}" for location, reason in skipped[:MAX_LISTED]],
    }
    return examples, summary


def config_name(paths: list[str], *settings) -> str:
    """'files-<hash>' of the files' paths, sizes and mtimes and the settings: editing a file rebuilds."""
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    return "files-" + hashlib.sha256(json.dumps([stats, *settings]).encode()).hexdigest()[:16]


def split_by_prompt(
    examples: list[tuple[str, dict]], eval_fraction: float
) -> dict[str, list[tuple[str, dict]]]:
    """{'train': ..., 'validation': ...}: about eval_fraction of the examples, whole prompts picked
    by hash (`heldout_units`), so a prompt and its duplicates are on one side only."""
    counts = collections.Counter(example["prompt"] for _, example in examples)
    heldout = heldout_units(dict(counts), eval_fraction)
    return {
        "train": [e for e in examples if e[1]["prompt"] not in heldout],
        "validation": [e for e in examples if e[1]["prompt"] in heldout],
    }


def build_splits(
    info,
    paths: list[str],
    to_example: Callable[[object], dict],
    skip_bad_records: bool,
    eval_fraction: float,
    usable: Callable[[dict], bool] = lambda example: True,
    what: str = "examples",
) -> tuple[dict, list[tuple[str, dict]]]:
    """Collects the files' examples (summary into info.metadata['records']), keeps the `usable`
    ones and splits them by prompt. Returns ({'train', 'validation'} lists, all examples)."""
    examples, summary = collect(paths, to_example, skip_bad_records)
    info.metadata["records"] = summary
    kept = [(location, e) for location, e in examples if usable(e)]
    splits = split_by_prompt(kept, eval_fraction)
    if not splits["train"] or not splits["validation"]:
        raise DataError(f"{_KEY}: {len(kept)} {what}; need 2 or more distinct prompts to hold one out")
    return splits, examples
