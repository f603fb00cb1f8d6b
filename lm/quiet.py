"""Keeps the libraries' routine chatter off the console; their errors stay visible.

`quiet_libraries()` is called where data preparation starts (lm/data/pipeline.py, lm/data/sft.py)
and may be called again by any entry point; it is idempotent. What it silences, and nothing else:
- TFDS's own tqdm bars ('Generating splits...', 'Shuffling ...').
- TFDS's absl records below ERROR ('Using custom data configuration: ...', 'Variant folder ... has
  no dataset_info.json'); other libraries' absl records (orbax, ...) are left as they are.
- TensorFlow's C++ and Python INFO/WARNING logs, when TensorFlow is installed (TFDS may import it).
  TF_CPP_MIN_LOG_LEVEL only takes effect before TensorFlow is imported; a value the user set wins.

TFDS's 'Downloading and preparing dataset ...' banner is a termcolor print, not a log record; the
builders of local files mix in `NoDownloadBanner` instead (a registered `tfds:<name>` dataset that
really downloads keeps it), and lm/data/pipeline.py prints one line of its own while preparing.
"""

from __future__ import annotations

import logging
import os

_TFDS_PATH = f"{os.sep}tensorflow_datasets{os.sep}"


class _DropTfdsChatter(logging.Filter):
    """Drops absl records below ERROR that TFDS's own modules emit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or _TFDS_PATH not in record.pathname


_FILTER = _DropTfdsChatter()


def quiet_libraries() -> None:
    """Silences TFDS's progress bars and sub-ERROR absl logs, and TensorFlow's INFO/WARNING logs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # 2: C++ errors only
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    import tensorflow_datasets as tfds
    from absl import logging as absl_logging  # absl creates its logger; getLogger("absl") first would not

    absl_logger = absl_logging.get_absl_logger()
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
    tfds.disable_progress_bar()


class NoDownloadBanner:
    """Mixin for TFDS builders of local files, which download nothing: no 'Downloading and preparing
    dataset Unknown size ...' / 'Dataset ... downloaded and prepared' lines (TFDS prints them
    unconditionally from these two methods). Put it before tfds.core.GeneratorBasedBuilder."""

    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass
