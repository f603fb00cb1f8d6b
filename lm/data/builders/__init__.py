"""TFDS builders of the corpora; `BUILDERS` maps `config.data.source` to a builder class.

Each writes ArrayRecord splits 'train' and 'validation'. Pretraining corpora (stdlib,
text_files) have features `text` and `path`; instruction data (alpaca, hh, graded_tasks, trl) has
`prompt`, `response` and `record` (where the example came from), and more per builder.
"""

from lm.data.builders.alpaca import Alpaca
from lm.data.builders.graded_tasks import GradedTasks
from lm.data.builders.hh import HH
from lm.data.builders.stdlib_source import StdlibSource
from lm.data.builders.text_files import TextFiles
from lm.data.builders.trl import TRL

BUILDERS = {
    "stdlib": StdlibSource,
    "text_files": TextFiles,
    "alpaca": Alpaca,
    "hh": HH,
    "graded_tasks": GradedTasks,
    "trl": TRL,
}
