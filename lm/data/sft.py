"""Supervised fine-tuning data: (prompt, response) examples -> packed rows, loss on the response.

Template. prompt_text = template.user + prompt + template.assistant (defaults 'User: ' and
'\nAssistant: '). A tokenizer with a chat template (an HF model's) formats every prompt instead: the
prompt as one user message plus the generation prompt (`format_prompt`); template.user and
template.assistant are then unused. An example's tokens are [BOS] + encode(prompt_text) +
encode(response) + [EOS], without the BOS for a Hugging Face tokenizer whose post-processor adds
none (GPT-2, Qwen2) and whose chat template renders none, as transformers encodes its prompts.
Prompt and response are encoded separately, so the prompt tokens are exactly those `encode_prompt`
gives when sampling. HH prompts are whole transcripts ending in "\n\nAssistant:" and get the
template like any prompt; a template with user '' and assistant ' ' keeps HH's own format instead. A
'trl' prompt may be a message list (the turns before the final assistant turn of a {"messages":
[...]} record): the chat template renders it, or else `render_messages`.

Packing. Examples are packed greedily in the dataset's stored order: each goes into the current row
while the row holds at most seq_len + 1 tokens (inputs are a row's first seq_len tokens, targets its
last seq_len), else it starts a new row; an example is never split. In a row the examples (found by
their offsets, BOS or not) are segments 1, 2, ... with positions from 0; the tail is padding (pad
id, segment 0, loss_mask 0). loss_mask[t] = 1 exactly when targets[t] is a response token or the
closing EOS. An example of more than seq_len + 1 tokens is a DataError, or skipped and counted with
skip_bad_records.

Caching. The dataset is built once under the data dir, under the pipeline's lock; the tokenized rows
are rebuilt on every call (50k graded-task examples, 4M tokens: about 2 s on 2 CPU cores with the
byte tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from lm.data import pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.data.pipeline import config_get
from lm.data.tokenizer import Tokenizer
from lm.errors import DataError
from lm.quiet import quiet_libraries

_SOURCES = "'alpaca', 'hh', 'trl' or 'graded_tasks'"
DEFAULT_USER, DEFAULT_ASSISTANT = "User: ", "\nAssistant: "
MAX_LISTED = 10  # skipped examples named in info (all are counted)


def format_prompt(template_cfg, prompt: str | Sequence[dict], tokenizer: Tokenizer | None = None) -> str:
    """The text the model continues with a response. prompt: a string, or a message list
    [{'role': 'system' | 'user' | 'assistant', 'content': str}] (TRL's conversational prompts).

    With a chat template (`tokenizer.chat_template`): the prompt (a string as one user message)
    rendered by it with the generation prompt, less a leading BOS token's text (the callers put the
    BOS id first themselves, see `encode_prompt`). Else template.user + prompt + template.assistant,
    a message list by `render_messages`; a one-user-message list formats as its content would.
    """
    return _split_prompt(template_cfg, prompt, tokenizer)[1]


def _split_prompt(template_cfg, prompt, tokenizer) -> tuple[bool, str]:
    """(whether the prompt starts with BOS, its formatted text less a rendered leading BOS).

    BOS when the tokenizer adds one to a text (`tokenizer_lib.bos_prefix`: ours always, a Hugging
    Face one as its post-processor does) or its chat template renders one first."""
    adds_bos = tokenizer is None or bool(tokenizer_lib.bos_prefix(tokenizer))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None) is not None:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        rendered_bos = text.startswith(tokenizer.bos_token)
        return adds_bos or rendered_bos, text.removeprefix(tokenizer.bos_token)
    return adds_bos, render_messages(template_cfg, messages)


def render_messages(template_cfg, messages: Sequence[dict]) -> str:
    """A message list in the config template, ending with template.assistant for the response:
    a system turn is its content + '\n\n', a user turn template.user + content, an earlier
    assistant turn template.assistant + content + '\n'. [system s, user q, assistant a, user r]
    with the default template: 's\n\nUser: q\nAssistant: a\nUser: r\nAssistant: '."""
    user = config_get(template_cfg, "user", DEFAULT_USER)
    assistant = config_get(template_cfg, "assistant", DEFAULT_ASSISTANT)
    turns = {"system": ("", "\n\n"), "user": (user, ""), "assistant": (assistant, "\n")}
    return "".join(turns[m["role"]][0] + m["content"] + turns[m["role"]][1] for m in messages) + assistant


def encode_prompt(tokenizer: Tokenizer, template_cfg, prompt: str | Sequence[dict]) -> list[int]:
    """[BOS] (unless the tokenizer adds none, see `_split_prompt`) + the ids of the formatted
    prompt: what the model continues with a response."""
    bos, text = _split_prompt(template_cfg, prompt, tokenizer)
    return [tokenizer.bos_id] * bos + tokenizer.encode(text)


def prompts_that_fit(
    tokenizer: Tokenizer, template_cfg, prompts: Sequence, max_tokens: int
) -> tuple[list, int]:
    """The [n] prompts whose `encode_prompt` tokens (BOS included) number at most max_tokens, in
    order, and how many are longer."""
    split = [_split_prompt(template_cfg, p, tokenizer) for p in prompts]
    lengths = [bos + len(ids) for (bos, _), ids in zip(split, tokenizer.encode_batch([t for _, t in split]))]
    kept = [p for p, length in zip(prompts, lengths) if length <= max_tokens]
    return kept, len(prompts) - len(kept)


def tokenize_examples(
    tokenizer: Tokenizer, template_cfg, examples: Sequence[dict]
) -> tuple[list[list[int]], list[int]]:
    """[n] examples -> [n] token lists `encode_prompt` + response + [EOS] ([BOS] + prompt + response
    + [EOS] unless the tokenizer adds no BOS), and [n] prompt lengths (with BOS)."""
    split = [_split_prompt(template_cfg, e["prompt"], tokenizer) for e in examples]
    prompts = [
        [tokenizer.bos_id] * bos + ids
        for (bos, _), ids in zip(split, tokenizer.encode_batch([t for _, t in split]))
    ]
    responses = tokenizer.encode_batch([e["response"] for e in examples])
    tokens = [[*p, *r, tokenizer.eos_id] for p, r in zip(prompts, responses)]
    return tokens, [len(p) for p in prompts]


def greedy_rows(lengths: Sequence[int], capacity: int) -> np.ndarray:
    """[num_rows + 1] the index of each row's first example, then len(lengths).

    Next-fit: an example joins the current row while the row's total stays <= capacity. Every
    length must be in [1, capacity].
    """
    starts, used = [], capacity
    for k, length in enumerate(lengths):
        if used + length > capacity:
            starts.append(k)
            used = 0
        used += length
    return np.array([*starts, len(lengths)], np.int64)


class PackedExamples:
    """Whole examples packed into rows; `rows`, `num_rows`, `seq_len`, `pad_id` as PackedRows."""

    def __init__(
        self,
        tokens: np.ndarray,
        loss_tokens: np.ndarray,
        row_offsets: np.ndarray,
        seq_len: int,
        bos_id: int,
        pad_id: int,
        example_starts: np.ndarray | None = None,
    ):
        """tokens: [num_tokens] the examples back to back; loss_tokens: [num_tokens] bool, True on
        response tokens and closing EOS; row_offsets: [num_rows + 1] where each row starts in tokens;
        example_starts: [num_tokens] bool, True on each example's first token (default: its BOS)."""
        self.tokens = tokens
        self.loss_tokens = loss_tokens
        self.row_offsets = row_offsets
        self.seq_len = seq_len
        self.bos_id = bos_id
        self.pad_id = pad_id
        self.example_starts = tokens == bos_id if example_starts is None else example_starts
        self.num_tokens = len(tokens)
        self.num_rows = len(row_offsets) - 1

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """indices: [n] ints in [0, num_rows) -> inputs, targets, segment_ids, positions: [n, seq_len]
        int32, loss_mask: [n, seq_len] float32."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            raise IndexError(f"row indices must lie in [0, {self.num_rows})")
        offsets = self.row_offsets[indices][:, None] + np.arange(self.seq_len + 1)  # [n, seq_len + 1]
        valid = offsets < self.row_offsets[indices + 1][:, None]
        at = np.minimum(offsets, self.num_tokens - 1)
        window = np.where(valid, self.tokens[at], self.pad_id)
        batch = pipeline.pack_window(window, valid, self.bos_id, starts=valid & self.example_starts[at])
        batch["loss_mask"] = (valid & self.loss_tokens[at])[:, 1:].astype(np.float32)
        return batch


def pack_examples(
    token_lists: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    seq_len: int,
    bos_id: int,
    pad_id: int,
) -> PackedExamples:
    """Packs [n] examples (each at most seq_len + 1 tokens) into rows; the response of example k
    is token_lists[k][prompt_lengths[k]:] (its closing EOS included)."""
    lengths = np.array([len(t) for t in token_lists], np.int64)
    tokens = np.concatenate([np.asarray(t, np.int32) for t in token_lists])
    example_offsets = np.concatenate([[0], np.cumsum(lengths)])
    in_example = np.arange(len(tokens)) - np.repeat(example_offsets[:-1], lengths)
    loss_tokens = in_example >= np.repeat(np.asarray(prompt_lengths, np.int64), lengths)
    row_offsets = example_offsets[greedy_rows(lengths.tolist(), seq_len + 1)]
    return PackedExamples(tokens, loss_tokens, row_offsets, seq_len, bos_id, pad_id, in_example == 0)


@dataclasses.dataclass
class SFTData:
    """What `prepare_sft_data` returns: packed splits, the held-out examples, a json-able info dict."""

    train: PackedExamples
    eval: PackedExamples
    eval_examples: list[dict]
    info: dict


def prepare_sft_data(data_cfg, template_cfg, tokenizer: Tokenizer, seq_len: int) -> SFTData:
    """Builds (or reuses) the dataset under the data dir and packs both splits with `tokenizer`.

    data_cfg: source ('alpaca' | 'hh' | 'trl' | 'graded_tasks'), files, eval_fraction, data_dir ('' ->
    $LM_DATA_DIR or ~/.cache/lm/data), skip_bad_records, and for graded_tasks: tasks, num_train,
    num_eval, task_seed. template_cfg: user, assistant. eval_examples: the held-out examples that
    fit (dicts of the dataset's features as str, plus task and meta for every source).
    """
    data_dir = pipeline.resolve_data_dir(config_get(data_cfg, "data_dir", ""))
    os.makedirs(data_dir, exist_ok=True)
    with pipeline.file_lock(os.path.join(data_dir, ".prepare.lock")):
        builder = open_sft_dataset(data_cfg, data_dir)
    skip = bool(config_get(data_cfg, "skip_bad_records", False))
    packed, kept, stats = {}, {}, {}
    for split in ("train", "validation"):
        packed[split], kept[split], stats[split] = pack_split(
            read_examples(builder, split), tokenizer, template_cfg, seq_len, skip
        )
    metadata = builder.info.metadata or {}
    info = {
        "source": config_get(data_cfg, "source", "graded_tasks"),
        "dataset": builder.name,
        "config": builder.builder_config.name,
        "version": str(builder.version),
        "dataset_dir": os.fspath(builder.data_dir),
        "build": {k: metadata[k] for k in ("records", "hh", "kind", "tasks", "seed") if k in metadata},
        "template": {
            "user": config_get(template_cfg, "user", DEFAULT_USER),
            "assistant": config_get(template_cfg, "assistant", DEFAULT_ASSISTANT),
        },
        "seq_len": seq_len,
        "tokenizer": tokenizer.identity,
        "splits": {"train": stats["train"], "eval": {"split": "validation", **stats["validation"]}},
    }
    return SFTData(
        train=packed["train"], eval=packed["validation"], eval_examples=kept["validation"], info=info
    )


def pack_split(
    examples: list[dict], tokenizer: Tokenizer, template_cfg, seq_len: int, skip: bool
) -> tuple[PackedExamples, list[dict], dict]:
    """One split's examples -> their packed rows, the examples that fit, and statistics."""
    tokens, prompt_lengths = tokenize_examples(tokenizer, template_cfg, examples)
    keep, too_long = fitting(examples, [len(t) for t in tokens], seq_len, skip)
    rows = pack_examples(
        [tokens[k] for k in keep],
        [prompt_lengths[k] for k in keep],
        seq_len,
        tokenizer.bos_id,
        tokenizer.pad_id,
    )
    stats = {
        **split_stats(rows),
        "num_skipped_too_long": len(too_long),
        "too_long_records": too_long[:MAX_LISTED],
    }
    return rows, [examples[k] for k in keep], stats


def open_sft_dataset(data_cfg, data_dir: str, kind: str = "sft"):
    """The prepared TFDS builder of `data_cfg.source` (prepared now when missing, in one line of
    `pipeline.first_run_note`). kind: how 'trl' files are read ('sft' | 'preference' | 'prompt',
    see `lm.data.builders.trl`); the other sources ignore it."""
    quiet_libraries()
    from lm.data.builders import BUILDERS

    source = config_get(data_cfg, "source", "graded_tasks")
    common = dict(data_dir=data_dir, file_format="array_record")
    if source in ("alpaca", "hh"):
        builder = BUILDERS[source](
            files=config_get(data_cfg, "files", ""),
            eval_fraction=float(config_get(data_cfg, "eval_fraction", 0.05)),
            skip_bad_records=bool(config_get(data_cfg, "skip_bad_records", False)),
            **common,
        )
    elif source == "trl":
        builder = BUILDERS[source](
            files=config_get(data_cfg, "files", ""),
            kind=kind,
            eval_fraction=float(config_get(data_cfg, "eval_fraction", 0.05)),
            skip_bad_records=bool(config_get(data_cfg, "skip_bad_records", False)),
            **common,
        )
    elif source == "graded_tasks":
        builder = BUILDERS[source](
            tasks=config_get(data_cfg, "tasks", "sort,add,reverse,constrained_line"),
            num_train=int(config_get(data_cfg, "num_train", 20_000)),
            num_eval=int(config_get(data_cfg, "num_eval", 500)),
            seed=int(config_get(data_cfg, "task_seed", 0)),
            **common,
        )
    else:
        raise DataError(f"config.data.source: unknown SFT source {source!r}; expected {_SOURCES}")
    with pipeline.first_run_note(source, data_dir) as begin:
        pipeline.prepare_builder(builder, begin)
    return builder


def read_examples(builder, split: str) -> list[dict]:
    """The split's examples in stored order: every feature (bytes decoded), plus task (default
    the dataset's name) and meta (default '{}'). A conversational prompt (the 'trl' builder's
    `conversational` feature) is decoded to its message list."""
    examples = []
    for record in pipeline.read_records(builder, split):
        example = {"task": builder.name, "meta": "{}", **{k: _plain(v) for k, v in record.items()}}
        if example.get("conversational"):
            example["prompt"] = json.loads(example["prompt"])
        examples.append(example)
    return examples


def _plain(value):
    """A feature value as a json-able Python value: bytes decoded as UTF-8, numpy scalars unwrapped."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def fitting(
    examples: Sequence[dict], lengths: Sequence[int], seq_len: int, skip: bool
) -> tuple[list[int], list[str]]:
    """Indices of the [n] examples of at most seq_len + 1 tokens (lengths: [n], template included),
    and 'record (N tokens)' for each longer one. A longer example is a DataError unless `skip`."""
    keep, too_long = [], []
    for k, (example, length) in enumerate(zip(examples, lengths)):
        if length <= seq_len + 1:
            keep.append(k)
        elif skip:
            too_long.append(f"{example['record']} ({length} tokens)")
        else:
            raise DataError(
                f"config.train.seq_len={seq_len}: example {example['record']} has {length} tokens "
                f"with the template, more than seq_len + 1 (config.data.skip_bad_records=True skips it)"
            )
    if not keep:
        raise DataError(
            f"config.train.seq_len={seq_len}: no example fits ({len(too_long)} longer than seq_len + 1)"
        )
    return keep, too_long


def split_stats(rows: PackedExamples) -> dict:
    """num_examples, num_rows, num_tokens, num_loss_tokens, loss_fraction (of the num_rows * seq_len
    targets) and response_fraction (of the example tokens)."""
    num_loss = int(rows.loss_tokens.sum())
    return {
        "num_examples": int(rows.example_starts.sum()),
        "num_rows": rows.num_rows,
        "num_tokens": rows.num_tokens,
        "num_loss_tokens": num_loss,
        "loss_fraction": num_loss / (rows.num_rows * rows.seq_len),
        "response_fraction": num_loss / rows.num_tokens,
    }
