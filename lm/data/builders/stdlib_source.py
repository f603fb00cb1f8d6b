"""The embedded default corpus: the running interpreter's standard library .py files.

One document per file (files that are empty, or not UTF-8 such as a few deliberately mis-encoded
test files, are skipped). The held-out 'validation' split is chosen by top-level package
(`email/`, `json/`, `os.py` -> `os`), so near-duplicate files of one package never straddle it.
The builder config name carries the Python version and a hash of the file list, so corpora of
different interpreters never collide in one data_dir.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig

import tensorflow_datasets as tfds
from etils import epath

from lm.errors import DataError
from lm.quiet import NoDownloadBanner

_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_root() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def list_source_files(root: str) -> list[str]:
    """Sorted '/'-separated paths of the .py files under `root`, without third-party packages."""
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIPPED_DIRS]
        rel = os.path.relpath(directory, root)
        found += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if f.endswith(".py")]
    return sorted(found)


def top_level_package(rel_path: str) -> str:
    """'email/mime/text.py' -> 'email'; 'os.py' -> 'os'."""
    return rel_path.split("/")[0].removesuffix(".py")


def heldout_units(sizes: dict[str, int], fraction: float, max_unit_fraction: float = 1.0) -> set[str]:
    """Deterministic held-out set: units taken in sha256-of-name order until `fraction` of the bytes.

    Units bigger than `max_unit_fraction` of the total are never held out. At least one unit is
    held out and, when there are two or more, at least one is left for training.
    """
    total = sum(sizes.values())
    chosen: set[str] = set()
    held = 0
    for name in sorted(sizes, key=lambda n: (hashlib.sha256(n.encode()).hexdigest(), n)):
        if (held >= fraction * total and chosen) or len(chosen) == len(sizes) - 1:
            break
        if sizes[name] <= max_unit_fraction * total:
            chosen.add(name)
            held += sizes[name]
    return chosen


class StdlibSource(NoDownloadBanner, tfds.core.GeneratorBasedBuilder):
    """Python standard library source; splits 'train' and 'validation'; features text, path."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One document per .py file; held-out split by top-level package."}
    # Where TFDS looks for a checksums file; set so that it skips its importlib_resources lookup,
    # which fails without that package (tensorflow/datasets#11212).
    code_path = epath.Path(__file__)

    def __init__(self, *, root: str | None = None, eval_fraction: float = 0.05, **kwargs):
        """root: a stdlib-like tree (default: this interpreter's); kwargs go to tfds (data_dir, ...)."""
        self._root = os.path.abspath(root or default_root())
        self._files = list_source_files(self._root)
        if not self._files:
            raise DataError(f"stdlib corpus: no .py files under {self._root}")
        self._file_list_sha256 = hashlib.sha256("\n".join(self._files).encode()).hexdigest()
        sizes: dict[str, int] = {}
        for f in self._files:
            package = top_level_package(f)
            sizes[package] = sizes.get(package, 0) + os.path.getsize(os.path.join(self._root, f))
        # Skipping packages over 10% of the corpus keeps e.g. the 17 MB `test` package in train.
        self._heldout = heldout_units(sizes, eval_fraction, max_unit_fraction=0.1)
        per_mille = round(eval_fraction * 1000)
        name = f"py{platform.python_version()}-{self._file_list_sha256[:12]}-eval{per_mille:03d}"
        config = tfds.core.BuilderConfig(name=name, description=f"Python {platform.python_version()} stdlib")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(
                python_version=platform.python_version(),
                file_list_sha256=self._file_list_sha256,
                num_files=len(self._files),
                heldout_packages=sorted(self._heldout),
            ),
        )

    def _split_generators(self, dl_manager):
        heldout = [f for f in self._files if top_level_package(f) in self._heldout]
        train = [f for f in self._files if top_level_package(f) not in self._heldout]
        return {"train": self._generate_examples(train), "validation": self._generate_examples(heldout)}

    def _generate_examples(self, files: list[str]):
        for rel in files:
            with open(os.path.join(self._root, rel), "rb") as f:
                data = f.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                yield rel, {"text": text, "path": rel}
