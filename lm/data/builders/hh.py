"""Dialogues in the Anthropic HH format: .jsonl (or .json array) records {"chosen": str,
"rejected": str}, each a transcript "\n\nHuman: ... \n\nAssistant: ...", possibly many turns.

A transcript splits at its last "\n\nAssistant:" into the prompt (everything up to and
including that marker, kept verbatim with all earlier turns) and the final response (stripped).
Features: prompt, response (the chosen final response, for SFT), chosen and rejected (the two
final responses), preference (whether (prompt, chosen, rejected) is a usable preference triple,
for a reward model), record (the location, see `records`).

Irregular pairs, counted in the metadata under `hh`:
- prompt_mismatch: chosen and rejected differ before their last "\n\nAssistant:" (the rejected
  response answers another dialogue). Kept for SFT with the chosen prompt; rejected is '' and
  preference False.
- empty_chosen_response: nothing to imitate and a blank "preferred" answer. Dropped.
- empty_rejected_response: kept for SFT; preference False.
A record may be counted in several kinds. Bad records (no "\n\nAssistant:" turn, missing or
non-string field, ...) are handled as in `records`. About `eval_fraction` of the examples, whole
prompts picked by hash, form 'validation'.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lm.data.builders import records
from lm.data.builders.text_files import resolve_files
from lm.quiet import NoDownloadBanner

ASSISTANT = "\n\nAssistant:"
IRREGULAR = ("prompt_mismatch", "empty_chosen_response", "empty_rejected_response")


def split_transcript(transcript: str, field: str) -> tuple[str, str]:
    """'...\n\nAssistant: Hi. ' -> ('...\n\nAssistant:', 'Hi.'); BadRecord without an Assistant turn."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        raise records.BadRecord(f"field {field!r} has no {ASSISTANT!r} turn")
    cut += len(ASSISTANT)
    return transcript[:cut], transcript[cut:].strip()


def hh_example(record: object) -> dict:
    """An HH record -> {prompt, response, chosen, rejected, preference, irregular: [kinds]}."""
    prompt, chosen = split_transcript(records.text_field(record, "chosen"), "chosen")
    rejected_prompt, rejected = split_transcript(records.text_field(record, "rejected"), "rejected")
    flags = (prompt != rejected_prompt, not chosen, not rejected)
    irregular = [kind for kind, flag in zip(IRREGULAR, flags) if flag]
    preference = not irregular
    return {
        "prompt": prompt,
        "response": chosen,
        "chosen": chosen,
        "rejected": rejected if preference else "",
        "preference": preference,
        "irregular": irregular,
    }


def irregular_summary(examples: list[tuple[str, dict]]) -> dict:
    """Counts of each IRREGULAR kind, and of the SFT examples and preference triples kept."""
    counts = {kind: sum(kind in e["irregular"] for _, e in examples) for kind in IRREGULAR}
    kept = [e for _, e in examples if e["response"]]
    return {
        **counts,
        "num_sft_examples": len(kept),
        "num_preference_pairs": sum(e["preference"] for e in kept),
    }


class HH(NoDownloadBanner, tfds.core.GeneratorBasedBuilder):
    """HH dialogues; splits 'train' and 'validation'; features prompt, response, chosen, rejected,
    preference, record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Split at the last Assistant turn; irregular pairs counted; held-out prompts by hash."
    }
    # Where TFDS looks for a checksums file; set so that it skips its importlib_resources lookup,
    # which fails without that package (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)

    def __init__(self, *, files: str, eval_fraction: float = 0.05, skip_bad_records: bool = False, **kwargs):
        """files: a glob or comma-separated globs/paths of .jsonl/.json; kwargs go to tfds."""
        self._paths = resolve_files(files, records.EXTENSIONS)
        self._eval_fraction = eval_fraction
        self._skip_bad_records = skip_bad_records
        name = records.config_name(self._paths, eval_fraction, skip_bad_records)
        super().__init__(
            config=tfds.core.BuilderConfig(name=name, description=f"{len(self._paths)} files"), **kwargs
        )

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": text,
                    "response": text,
                    "chosen": text,
                    "rejected": text,
                    "preference": tfds.features.Scalar(np.bool_),
                    "record": text,
                }
            ),
            metadata=tfds.core.MetadataDict(files=self._paths),
        )

    def _split_generators(self, dl_manager):
        splits, examples = records.build_splits(
            self.info,
            self._paths,
            hh_example,
            self._skip_bad_records,
            self._eval_fraction,
            usable=lambda e: bool(e["response"]),
            what="usable dialogues",
        )
        self.info.metadata["hh"] = irregular_summary(examples)
        return {split: self._generate_examples(part) for split, part in splits.items()}

    def _generate_examples(self, examples: list[tuple[str, dict]]):
        for location, example in examples:
            features = {k: v for k, v in example.items() if k != "irregular"}
            yield location, {**features, "record": location}
