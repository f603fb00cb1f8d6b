"""Comparison data for reward models: prompts with K ranked responses, as fixed arrays.

A comparison is one prompt with up to K responses. Each response is the sequence [BOS] +
encode(template.user + prompt + template.assistant) + response + [EOS], right-padded to seq_len;
its score is read at the EOS (`last_index`). Ranks are 0 = best; equal ranks are ties and form no
pair; padding slots of prompts with fewer than K responses are masked. Prompts whose responses
all tie are dropped (they would add nothing to the loss).

Sources (config.data.source):
- 'hh': the HH builder's preference triples (`lm.data.builders.hh`), K = 2: chosen rank 0,
  rejected rank 1; train and eval from its 'train' and 'validation' splits (prompts split by hash).
- 'trl': {"prompt", "chosen", "rejected"} records of config.data.files (`lm.data.builders.trl`,
  read as 'preference'), exactly as 'hh'.
- 'graded_tasks': K samples of the SFT policy per prompt, ranked by the task's grader (the oracle).
  The prompts are held out from SFT: they come from the 'validation' side of
  `graded_tasks.split_of`, a fixed function of the prompt text, so no SFT train set of any seed
  or size contains them; the SFT run's own held-out prompts, on which it chose its best
  checkpoint, are dropped as well. The first `num_eval` of them form the eval comparisons, the
  next `num_train` the train comparisons.

Label noise p (`reverse_rankings`, for the train comparisons; held-out ones keep their labels):
each prompt's ranking is reversed with probability p, so every pair's order is swapped with
probability p (for K = 2 exactly a swapped triple; the pairs of one prompt swap together).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from lm import metrics as metrics_lib
from lm import sampling
from lm.data import graded_tasks, pipeline
from lm.data import sft as sft_data
from lm.data.pipeline import config_get
from lm.data.tokenizer import Tokenizer
from lm.errors import ConfigError, DataError

ARRAYS = ("tokens", "first_index", "last_index", "ranks", "mask")
FORMAT = 2  # of the cached comparisons.npz (2: first_index)


@dataclasses.dataclass
class Comparisons:
    """n prompts with up to K ranked responses each."""

    tokens: np.ndarray  # [n, K, seq] int32, right-padded
    first_index: np.ndarray  # [n, K] int32 column of each response's first token (after the prompt)
    last_index: np.ndarray  # [n, K] int32 column of each response's EOS
    ranks: np.ndarray  # [n, K] int32, 0 = best, equal = tie
    mask: np.ndarray  # [n, K] bool, False on padding slots

    @property
    def num_prompts(self) -> int:
        return len(self.tokens)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """indices: [b] ints in [0, n) -> the arrays of those prompts ([b, K, seq], [b, K] x 4)."""
        return {name: getattr(self, name)[indices] for name in ARRAYS}

    def num_pairs(self) -> int:
        """Ranked (untied) pairs of valid responses over all prompts."""
        return int(pair_counts(self.ranks, self.mask).sum())


@dataclasses.dataclass
class PreferenceData:
    """What `prepare_comparisons` returns: train and eval comparisons, the responses that the
    normalisation runs over, and a json-able info dict."""

    train: Comparisons
    eval: Comparisons
    norm_tokens: np.ndarray  # [m, seq] int32: responses of the SFT policy (HH: the chosen ones)
    norm_first_index: np.ndarray  # [m] int32
    norm_last_index: np.ndarray  # [m] int32
    info: dict


def selection_and_test(held_out: Comparisons) -> tuple[Comparisons, Comparisons]:
    """The held-out comparisons split in two disjoint halves by prompt: the first (rounded up)
    chooses checkpoints (eval_accuracy), the second is the test set measured once at the end."""
    half = (held_out.num_prompts + 1) // 2
    return (
        Comparisons(**held_out.take(np.arange(half))),
        Comparisons(**held_out.take(np.arange(half, held_out.num_prompts))),
    )


def pair_counts(ranks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[n, K] ranks and mask -> [n] number of valid pairs with different ranks."""
    valid = mask[:, :, None] & mask[:, None, :]
    return np.sum(valid & (ranks[:, :, None] < ranks[:, None, :]), axis=(1, 2))


def dense_ranks(scores: Sequence[float]) -> list[int]:
    """[k] scores -> [k] ranks: 0 for the highest score, equal scores share a rank."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def build_comparisons(
    groups: Sequence[Sequence[Sequence[int]]],
    ranks: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    seq_len: int,
    pad_id: int,
    k: int | None = None,
) -> Comparisons:
    """[n] prompts' token lists ([k_i] sequences of at most seq_len tokens, each ending in EOS),
    [n][k_i] ranks and [n] prompt lengths (the tokens before each response, BOS included) ->
    Comparisons padded to K = k (default max k_i) responses and seq_len tokens."""
    k = k or max(len(g) for g in groups)
    n = len(groups)
    tokens = np.full((n, k, seq_len), pad_id, np.int32)
    first_index = np.zeros((n, k), np.int32)
    last_index = np.zeros((n, k), np.int32)
    rank_array = np.zeros((n, k), np.int32)
    mask = np.zeros((n, k), bool)
    for i, (group, group_ranks, prompt_length) in enumerate(zip(groups, ranks, prompt_lengths)):
        for j, (sequence, rank) in enumerate(zip(group, group_ranks)):
            tokens[i, j, : len(sequence)] = sequence
            last_index[i, j], rank_array[i, j], mask[i, j] = len(sequence) - 1, rank, True
            first_index[i, j] = prompt_length
    return Comparisons(tokens, first_index, last_index, rank_array, mask)


def with_pairs(comparisons: Comparisons) -> Comparisons:
    """Only the prompts with at least one untied pair."""
    keep = np.flatnonzero(pair_counts(comparisons.ranks, comparisons.mask) > 0)
    return Comparisons(**comparisons.take(keep))


WIDTH_MULTIPLE = 16  # batch widths are multiples of this: a run compiles a handful of shapes


def prompt_lengths(comparisons: Comparisons) -> np.ndarray:
    """[n] columns each prompt needs: its longest valid response's last_index + 1."""
    return np.max(np.where(comparisons.mask, comparisons.last_index, 0), axis=1) + 1


def batch_width(lengths: np.ndarray, seq_len: int, multiple: int = WIDTH_MULTIPLE) -> int:
    """The columns a batch of sequences needs: its longest `lengths` rounded up to `multiple`, at
    most seq_len."""
    return min(seq_len, -(-int(np.max(lengths)) // multiple) * multiple)


def trim(batch: dict, width: int) -> dict:
    """`batch` with its [..., seq] 'tokens' cut to `width` columns (the rest is padding)."""
    return {**batch, "tokens": batch["tokens"][..., :width]}


def in_length_order(call, lengths: np.ndarray, rows: int, seq_len: int) -> np.ndarray:
    """[m] float64 values of m sequences, computed `rows` at a time in order of length.

    call: `(ids [rows], width) -> [rows]` values of those sequences cut to `width` columns
    (`batch_width` of their lengths); the last call's ids are padded by repeating the last one,
    so every call has one shape per width.
    """
    m = len(lengths)
    order = np.argsort(lengths, kind="stable")
    out = np.zeros(m)
    for start in range(0, m, rows):
        ids = order[np.minimum(start + np.arange(rows), m - 1)]
        out[ids] = np.asarray(call(ids, batch_width(lengths[ids], seq_len)))
    return out


def grouped_batch_ids(lengths: np.ndarray, step: int, batch_size: int, seed: int, group: int) -> np.ndarray:
    """[batch_size] prompt ids of the global batch at `step`, batches grouped by length.

    `group` consecutive batches form a megabatch: `pipeline.global_row_ids` rows of one draw of
    group x batch_size (epochs of a seeded permutation), sorted by length and cut into `group`
    batches taken in a seeded order. Each batch then spans few widths, so `trim` drops most of the
    padding, while every prompt is still seen once an epoch. group = 1 is the plain shuffled batch.
    A pure function of (seed, step).
    """
    mega, index = divmod(step, group)
    ids = pipeline.global_row_ids(len(lengths), mega, group * batch_size, seed)
    ids = ids[np.argsort(lengths[ids], kind="stable")].reshape(group, batch_size)
    return ids[np.random.default_rng([seed, mega, 3]).permutation(group)[index]]


def reverse_rankings(ranks: np.ndarray, mask: np.ndarray, p: float, seed: int) -> np.ndarray:
    """Label noise: [n, K] ranks with each prompt's ranking reversed (best <-> worst, ties kept)
    with probability p; mask [n, K] says which slots are valid."""
    flip = np.random.default_rng([seed, 1]).random(len(ranks)) < p  # [n]
    worst = np.max(np.where(mask, ranks, 0), axis=1, keepdims=True)  # [n, 1]
    return np.where(flip[:, None] & mask, worst - ranks, ranks).astype(np.int32)


def stats(comparisons: Comparisons) -> dict:
    """num_prompts, num_responses, num_pairs, K."""
    return {
        "num_prompts": comparisons.num_prompts,
        "num_responses": int(comparisons.mask.sum()),
        "num_pairs": comparisons.num_pairs(),
        "K": int(comparisons.mask.shape[1]),
    }


# --- preference files: HH and TRL ------------------------------------------------------------


def pair_comparisons(
    data_cfg, template_cfg, tokenizer: Tokenizer, seq_len: int, limits: tuple[int, int]
) -> PreferenceData:
    """The preference triples of data_cfg.source ('hh' | 'trl') as K = 2 comparisons (chosen rank
    0, rejected rank 1).

    data_cfg: source, files, eval_fraction, data_dir, skip_bad_records (as SFT's). A triple
    whose longer sequence exceeds seq_len tokens is a DataError, or skipped and counted with
    skip_bad_records. limits: (train, eval) at most this many triples of each split (0: all).
    The normalisation set is the chosen responses.
    """
    builder = open_files_dataset(data_cfg, "preference")
    skip = bool(config_get(data_cfg, "skip_bad_records", False))
    metadata = builder.info.metadata or {}
    splits, info = (
        {},
        {
            "source": config_get(data_cfg, "source", "hh"),
            "dataset": builder.name,
            "config": builder.builder_config.name,
            "version": str(builder.version),
            **{k: dict(metadata[k]) for k in ("hh", "records") if k in metadata},
        },
    )
    for split, name, limit in (("train", "train", limits[0]), ("validation", "eval", limits[1])):
        triples = [e for e in sft_data.read_examples(builder, split) if e["preference"]]
        groups, prompt_lengths, too_long = hh_sequences(triples, tokenizer, template_cfg, seq_len, skip)
        groups, prompt_lengths = (
            (groups[:limit], prompt_lengths[:limit]) if limit else (groups, prompt_lengths)
        )
        if not groups:
            raise DataError(
                f"config.data.files: no usable preference triple in the {split} split "
                f"({len(too_long)} longer than seq_len={seq_len})"
            )
        splits[name] = build_comparisons(
            groups, [[0, 1]] * len(groups), prompt_lengths, seq_len, tokenizer.pad_id, k=2
        )
        info[name] = {
            **stats(splits[name]),
            "num_skipped_too_long": len(too_long),
            "too_long_records": too_long[: sft_data.MAX_LISTED],
        }
    chosen = {
        field: np.concatenate([getattr(splits[name], field)[:, 0] for name in ("train", "eval")])
        for field in ("tokens", "first_index", "last_index")
    }
    return PreferenceData(
        splits["train"], splits["eval"], chosen["tokens"], chosen["first_index"], chosen["last_index"], info
    )


hh_comparisons = pair_comparisons  # the name of the HH-only days


def open_files_dataset(data_cfg, kind: str):
    """The prepared builder of `data_cfg` (source 'hh' | 'trl', files, eval_fraction, data_dir,
    skip_bad_records), prepared now under the data dir's lock when missing; kind: how 'trl' files
    are read ('sft' | 'preference' | 'prompt')."""
    data_dir = pipeline.resolve_data_dir(config_get(data_cfg, "data_dir", ""))
    os.makedirs(data_dir, exist_ok=True)
    with pipeline.file_lock(os.path.join(data_dir, ".prepare.lock")):
        return sft_data.open_sft_dataset(data_cfg, data_dir, kind)


def file_prompts(data_cfg, split: str) -> list:
    """The distinct prompts of `split` ('train' | 'validation') of data_cfg.source in stored order.
    'hh': each dialogue up to and including its last "\n\nAssistant:", of every usable dialogue
    (preference triple or not). 'trl': the "prompt" of every record (a string or a message list).
    data_cfg as `pair_comparisons`'."""
    examples = sft_data.read_examples(open_files_dataset(data_cfg, "prompt"), split)
    distinct = {json.dumps(e["prompt"]): e["prompt"] for e in examples}
    return list(distinct.values())


hh_prompts = file_prompts


def hh_sequences(
    triples: list[dict], tokenizer: Tokenizer, template_cfg, seq_len: int, skip: bool
) -> tuple[list[list[list[int]]], list[int], list[str]]:
    """[n] triples -> [(chosen tokens, rejected tokens)] for those that fit in seq_len tokens, their
    prompt lengths, and 'record (N tokens)' for each longer one (a DataError unless `skip`)."""
    both = [
        {"prompt": t["prompt"], "response": t[field]} for t in triples for field in ("chosen", "rejected")
    ]
    tokens, prompt_lengths = sft_data.tokenize_examples(tokenizer, template_cfg, both)
    groups, kept_lengths, too_long = [], [], []
    for t, pair, prompt_length in zip(triples, zip(tokens[0::2], tokens[1::2]), prompt_lengths[0::2]):
        longest = max(len(s) for s in pair)
        if longest <= seq_len:
            groups.append(list(pair))
            kept_lengths.append(prompt_length)
        elif skip:
            too_long.append(f"{t['record']} ({longest} tokens)")
        else:
            raise DataError(
                f"config.train.seq_len={seq_len}: preference triple {t['record']} has {longest} tokens "
                f"with the template (config.data.skip_bad_records=True skips it)"
            )
    return groups, kept_lengths, too_long


# --- graded tasks: samples of the SFT policy ranked by the grader -----------------------------


def held_out_prompts(tasks: str, num: int, seed: int, exclude: set[str]) -> list[dict]:
    """`num` examples (make_examples dicts) of 'validation'-side prompts not in `exclude`, in
    make_examples order (a prefix is stable as `num` grows)."""
    drawn = graded_tasks.make_examples(tasks, num + len(exclude), seed, "validation")
    kept = [e for e in drawn if e["prompt"] not in exclude]
    return kept[:num]


def sft_heldout_prompts(sft_data_cfg: dict) -> set[str]:
    """The held-out prompts of an SFT run on graded tasks (its config.data), else an empty set."""
    if sft_data_cfg.get("source") != "graded_tasks":
        return set()
    examples = graded_tasks.make_examples(
        sft_data_cfg["tasks"], int(sft_data_cfg["num_eval"]), int(sft_data_cfg["task_seed"]), "validation"
    )
    return {e["prompt"] for e in examples}


def rl_eval_prompts(tasks: str, num: int, seed: int, sft_data_cfg: dict) -> list[dict]:
    """The held-out prompts PPO and DPO evaluate on and keep their best policy by: 'validation'
    side, drawn from seed + 3, none of the SFT run's own eval prompts (SFT kept the checkpoint that
    scored best on those, so there every later policy would start behind a lucky SFT)."""
    return held_out_prompts(tasks, num, seed + 3, sft_heldout_prompts(sft_data_cfg))


def sample_responses(
    params,
    model_cfg,
    tokenizer: Tokenizer,
    prompts: list[list[int]],
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch: int,
    rng,
) -> list[list[list[int]]]:
    """[n] prompt token lists -> [n][k] sampled responses (token lists without EOS), `batch` rows
    per sampler call (`sampling.generate_sorted`)."""
    rows = [p for p in prompts for _ in range(k)]
    completions = sampling.generate_sorted(
        params,
        model_cfg,
        rows,
        max_batch=batch,
        max_new_tokens=max_new_tokens,
        rng=rng,
        temperature=temperature,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    responses = [[t for t in c if t != tokenizer.eos_id] for c in completions]
    return [responses[i * k : (i + 1) * k] for i in range(len(prompts))]


def graded_comparisons(
    examples: list[dict],
    prompts: list[list[int]],
    responses: list[list[list[int]]],
    tokenizer: Tokenizer,
    seq_len: int,
) -> tuple[Comparisons, np.ndarray]:
    """[n] examples, their prompt tokens and [n][k] responses -> (Comparisons of every prompt,
    ranked by the grader's score, ties equal; [n, k] float32 grader scores)."""
    scores = np.array(
        [
            [graded_tasks.grade(e["task"], e["meta"], tokenizer.decode(r))["score"] for r in group]
            for e, group in zip(examples, responses)
        ],
        np.float32,
    )
    groups = [[p + r + [tokenizer.eos_id] for r in group] for p, group in zip(prompts, responses)]
    ranks = [dense_ranks(s.tolist()) for s in scores]
    return build_comparisons(groups, ranks, [len(p) for p in prompts], seq_len, tokenizer.pad_id), scores


def policy_comparisons(
    params,
    model_cfg,
    tokenizer: Tokenizer,
    template_cfg,
    data_cfg,
    reward_cfg,
    sft_data_cfg: dict,
    seq_len: int,
    seed: int,
) -> PreferenceData:
    """Samples, grades and ranks the SFT policy's responses to held-out graded-task prompts.

    data_cfg: tasks, task_seed (which prompts). reward_cfg: samples_per_prompt (K), temperature,
    max_new_tokens, sample_batch, num_prompts (train), num_eval_prompts.
    sft_data_cfg: the SFT run's config.data (its held-out prompts are excluded). params: the
    policy's variables' 'params' for `Transformer(model_cfg)`. Every valid response is in the
    normalisation set.
    """
    num_eval, num_train = int(reward_cfg.num_eval_prompts), int(reward_cfg.num_prompts)
    examples = held_out_prompts(
        data_cfg.tasks, num_eval + num_train, int(data_cfg.task_seed), sft_heldout_prompts(sft_data_cfg)
    )
    prompts = [sft_data.encode_prompt(tokenizer, template_cfg, e["prompt"]) for e in examples]
    longest = max(len(p) for p in prompts) + reward_cfg.max_new_tokens + 1
    if longest > seq_len:
        raise ConfigError(
            f"config.train.seq_len={seq_len} is less than the longest prompt + "
            f"config.reward.max_new_tokens={reward_cfg.max_new_tokens} + EOS ({longest} tokens)"
        )
    responses = sample_responses(
        {"params": params},
        model_cfg,
        tokenizer,
        prompts,
        k=int(reward_cfg.samples_per_prompt),
        temperature=float(reward_cfg.temperature),
        max_new_tokens=int(reward_cfg.max_new_tokens),
        batch=int(reward_cfg.sample_batch),
        rng=jax.random.PRNGKey(seed),
    )
    every, scores = graded_comparisons(examples, prompts, responses, tokenizer, seq_len)
    eval_all = Comparisons(**every.take(np.arange(num_eval)))
    train_all = Comparisons(**every.take(np.arange(num_eval, num_eval + num_train)))
    splits = {"train": with_pairs(train_all), "eval": with_pairs(eval_all)}
    for name, split in splits.items():
        if split.num_prompts == 0:
            raise DataError(
                f"graded_tasks: no {name} prompt has two responses with different grader scores "
                f"(config.reward.temperature={reward_cfg.temperature})"
            )
    sampled = {"train": num_train, "eval": num_eval}
    info = {
        "source": "graded_tasks",
        "tasks": graded_tasks.parse_tasks(data_cfg.tasks),
        "task_seed": int(data_cfg.task_seed),
        "policy_mean_score": float(scores.mean()),
        **{name: {**stats(split), "num_prompts_sampled": sampled[name]} for name, split in splits.items()},
    }
    return PreferenceData(
        splits["train"],
        splits["eval"],
        every.tokens[every.mask],
        every.first_index[every.mask],
        every.last_index[every.mask],
        info,
    )


# --- the workdir cache ------------------------------------------------------------------------


def save(path: str, data: PreferenceData, fingerprint: str) -> None:
    """Writes `data` to `path` (.npz, atomically); `fingerprint` names what it was built from."""
    arrays = {
        f"{split}_{name}": getattr(getattr(data, split), name)
        for split in ("train", "eval")
        for name in ARRAYS
    }
    with metrics_lib.atomic_path(path, suffix=".npz") as tmp:
        np.savez(
            tmp,
            norm_tokens=data.norm_tokens,
            norm_first_index=data.norm_first_index,
            norm_last_index=data.norm_last_index,
            fingerprint=np.array(f"{FORMAT}:{fingerprint}"),
            info=np.array(json.dumps(data.info, default=str)),
            **arrays,
        )


def load(path: str, fingerprint: str | None = None) -> PreferenceData | None:
    """The data saved at `path`, or None when there is none, it was built from another fingerprint,
    or it is of an older format."""
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        saved_format, _, saved = str(f["fingerprint"]).partition(":")
        if saved_format != str(FORMAT) or (fingerprint is not None and saved != fingerprint):
            return None
        splits = {
            split: Comparisons(**{name: f[f"{split}_{name}"] for name in ARRAYS})
            for split in ("train", "eval")
        }
        return PreferenceData(
            splits["train"],
            splits["eval"],
            f["norm_tokens"],
            f["norm_first_index"],
            f["norm_last_index"],
            json.loads(str(f["info"])),
        )
