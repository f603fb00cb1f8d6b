"""TFDS builders of the corpora; `BUILDERS` maps `config.data.source` to a builder class.

Each writes ArrayRecord splits 'train' and 'validation' with features `text` and `path`.
"""
from lm.data.builders.stdlib_source import StdlibSource
from lm.data.builders.text_files import TextFiles

BUILDERS = {"stdlib": StdlibSource, "text_files": TextFiles}
