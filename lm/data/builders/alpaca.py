"""Instruction data in the Alpaca format: .json arrays or .jsonl files of records
{"instruction": str, "input": str, "output": str}.

prompt = instruction, plus "\n\n" + input when input is not blank; response = output. `input` may
be absent or empty; instruction and output must be non-empty strings. Bad records: see
`records`. About `eval_fraction` of the examples, whole prompts picked by hash, form
'validation'. Metadata: files, the record summary (`records.collect`).
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath

from lm.data.builders import records
from lm.data.builders.text_files import resolve_files
from lm.quiet import NoDownloadBanner


def alpaca_example(record: object) -> dict:
    """An Alpaca record -> {'prompt', 'response'}; BadRecord when a field is missing or not a string."""
    instruction = records.text_field(record, "instruction")
    extra = records.text_field(record, "input", required=False, allow_empty=True)
    response = records.text_field(record, "output")
    return {"prompt": f"{instruction}\n\n{extra}" if extra.strip() else instruction, "response": response}


class Alpaca(NoDownloadBanner, tfds.core.GeneratorBasedBuilder):
    """Alpaca-format files; splits 'train' and 'validation'; features prompt, response, record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Alpaca records; held-out prompts by hash; bad records stop or are skipped."}
    # Where TFDS looks for a checksums file; set so that it skips its importlib_resources lookup,
    # which fails without that package (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)

    def __init__(self, *, files: str, eval_fraction: float = 0.05, skip_bad_records: bool = False, **kwargs):
        """files: a glob or comma-separated globs/paths of .json/.jsonl; kwargs go to tfds."""
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
            features=tfds.features.FeaturesDict({"prompt": text, "response": text, "record": text}),
            metadata=tfds.core.MetadataDict(files=self._paths),
        )

    def _split_generators(self, dl_manager):
        splits, _ = records.build_splits(
            self.info, self._paths, alpaca_example, self._skip_bad_records, self._eval_fraction
        )
        return {split: self._generate_examples(part) for split, part in splits.items()}

    def _generate_examples(self, examples: list[tuple[str, dict]]):
        for location, example in examples:
            yield location, {**example, "record": location}
