"""Data in the TRL conventions: .jsonl (or .json array) records, read for one of three uses (`kind`).

- 'sft': {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]} ending in
  an assistant turn: the prompt is every earlier turn (a message list), the response the final
  assistant turn's content. Also TRL's {"prompt", "completion"} pairs and {"prompt", "chosen",
  ...} triples (the response is the chosen one, as HH's SFT).
- 'preference': {"prompt": str, "chosen": str, "rejected": str}; or conversational, with prompt a
  message list and chosen and rejected each a list of one assistant message.
- 'prompt': {"prompt": str} or a message list not ending in an assistant turn (the prompts of PPO
  and GRPO); other keys are ignored.

Features: prompt (the text, or for a message list its compact JSON), conversational (whether
prompt is a message list; `lm.data.sft.read_examples` decodes it back), response (the completion;
for 'preference', the chosen response; '' for 'prompt'), chosen and rejected ('' unless
'preference'), preference (True exactly for 'preference' records), record (the location, see
`records`). Bad records are handled as in `records`; about `eval_fraction` of the examples, whole
prompts picked by hash, form 'validation'.
"""

from __future__ import annotations

import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lm.data.builders import records
from lm.data.builders.text_files import resolve_files
from lm.quiet import NoDownloadBanner

KINDS = ("sft", "preference", "prompt")
ROLES = ("system", "user", "assistant")
MESSAGES = 'a list of {"role", "content"} objects'
EXPECTED = {
    "sft": f'"messages": {MESSAGES} ending in an assistant turn, or "prompt" and "completion"',
    "preference": '"prompt", "chosen" and "rejected"',
    "prompt": '"prompt": a string or a list of {"role", "content"} objects',
}


def message_list(value: object, field: str) -> list[dict]:
    """A TRL message list -> [{'role', 'content'}] (other keys dropped); BadRecord unless it is a
    non-empty list of objects with a role in ROLES and a string content."""
    if not isinstance(value, list) or not value:
        raise records.BadRecord(f"expected {field!r}: {MESSAGES}")
    out = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise records.BadRecord(f"expected {field!r}: {MESSAGES} (message {number} is not)")
        if message.get("role") not in ROLES:
            raise records.BadRecord(
                f"expected {field!r}: {MESSAGES} (message {number} has role {message.get('role')!r}, "
                f"not one of {ROLES})"
            )
        out.append({"role": message["role"], "content": message["content"]})
    return out


def prompt_field(record: dict, field: str = "prompt") -> str | list[dict]:
    """record[field]: a non-empty string, or a message list not ending in an assistant turn."""
    value = record[field]
    if isinstance(value, str):
        return records.text_field(record, field)
    if not isinstance(value, list):
        raise records.BadRecord(f"expected {field!r}: a string or {MESSAGES}")
    messages = message_list(value, field)
    if messages[-1]["role"] == "assistant":
        raise records.BadRecord(f"field {field!r} ends in an assistant turn (expected a prompt)")
    return messages


def response_field(record: dict, field: str) -> str:
    """record[field]: a non-empty string, or a list of one assistant message -> its content."""
    value = record[field]
    if isinstance(value, str):
        return records.text_field(record, field)
    if not isinstance(value, list):
        raise records.BadRecord(f"expected {field!r}: a string or a list of one assistant message")
    messages = message_list(value, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant" or not messages[0]["content"].strip():
        raise records.BadRecord(f"expected {field!r}: a string or a list of one non-empty assistant message")
    return messages[0]["content"]


def prompt_text(prompt: str | list[dict]) -> str:
    """The stored prompt feature: the text itself, or a message list's compact JSON."""
    return (
        prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, separators=(",", ":"))
    )


def _example(prompt, response: str = "", chosen: str = "", rejected: str = "", preference=False) -> dict:
    return {
        "prompt": prompt_text(prompt),
        "conversational": not isinstance(prompt, str),
        "response": response,
        "chosen": chosen,
        "rejected": rejected,
        "preference": preference,
    }


def _has(record: object, *fields: str) -> bool:
    return isinstance(record, dict) and all(f in record for f in fields)


def sft_example(record: object) -> dict:
    """A 'sft' record -> the builder's features (prompt, conversational, response, ...)."""
    if _has(record, "messages"):
        messages = message_list(record["messages"], "messages")
        last = messages[-1]
        if len(messages) < 2 or last["role"] != "assistant" or not last["content"].strip():
            raise records.BadRecord(f"expected {EXPECTED['sft']}")
        return _example(messages[:-1], response=last["content"])
    for field in ("completion", "chosen"):
        if _has(record, "prompt", field):
            return _example(prompt_field(record), response=response_field(record, field))
    raise records.BadRecord(f"expected {EXPECTED['sft']}")


def preference_example(record: object) -> dict:
    """A 'preference' record -> the builder's features; response is the chosen one."""
    if not _has(record, "prompt", "chosen", "rejected"):
        raise records.BadRecord(f"expected {EXPECTED['preference']}")
    chosen, rejected = response_field(record, "chosen"), response_field(record, "rejected")
    return _example(prompt_field(record), response=chosen, chosen=chosen, rejected=rejected, preference=True)


def prompt_example(record: object) -> dict:
    """A 'prompt' record -> the builder's features (only the prompt is read)."""
    if not _has(record, "prompt"):
        raise records.BadRecord(f"expected {EXPECTED['prompt']}")
    return _example(prompt_field(record))


TO_EXAMPLE = {"sft": sft_example, "preference": preference_example, "prompt": prompt_example}


class TRL(NoDownloadBanner, tfds.core.GeneratorBasedBuilder):
    """TRL-convention files read as `kind`; splits 'train' and 'validation'; features prompt,
    conversational, response, chosen, rejected, preference, record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "messages / prompt-completion / preference / prompt records; prompts by hash."}
    # Where TFDS looks for a checksums file; set so that it skips its importlib_resources lookup,
    # which fails without that package (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)

    def __init__(
        self,
        *,
        files: str,
        kind: str = "sft",
        eval_fraction: float = 0.05,
        skip_bad_records: bool = False,
        **kwargs,
    ):
        """files: a glob or comma-separated globs/paths of .jsonl/.json; kind: one of KINDS;
        kwargs go to tfds."""
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
        self._paths = resolve_files(files, records.EXTENSIONS)
        self._kind = kind
        self._eval_fraction = eval_fraction
        self._skip_bad_records = skip_bad_records
        name = records.config_name(self._paths, kind, eval_fraction, skip_bad_records)
        super().__init__(
            config=tfds.core.BuilderConfig(name=name, description=f"{kind}: {len(self._paths)} files"),
            **kwargs,
        )

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        flag = tfds.features.Scalar(np.bool_)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": text,
                    "conversational": flag,
                    "response": text,
                    "chosen": text,
                    "rejected": text,
                    "preference": flag,
                    "record": text,
                }
            ),
            metadata=tfds.core.MetadataDict(files=self._paths, kind=self._kind),
        )

    def _split_generators(self, dl_manager):
        splits, _ = records.build_splits(
            self.info,
            self._paths,
            TO_EXAMPLE[self._kind],
            self._skip_bad_records,
            self._eval_fraction,
            what=f"{self._kind} records",
        )
        return {split: self._generate_examples(part) for split, part in splits.items()}

    def _generate_examples(self, examples: list[tuple[str, dict]]):
        for location, example in examples:
            yield location, {**example, "record": location}
