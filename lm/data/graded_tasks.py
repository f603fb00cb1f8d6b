"""Graded synthetic instruction tasks: generators of (prompt, ideal response, meta) and graders.

A grader scores any response text in [0, 1] (partial credit) and says whether it is an exact
match. Partial credit is positional against the answer, so copying the prompt earns little:

- `sort`: "Sort: 42 7 93 15 60" -> "7 15 42 60 93" (5 to 8 distinct integers in 0-99, never
  given already sorted). The response is split on whitespace; score = the number of positions i
  where token i equals the i-th number of the sorted list, divided by max(len(answer),
  len(response tokens)). A copy of the unsorted numbers matches only the fixed points of a
  random permutation (1 expected, so about 1/n).
- `add`: "Add: 417 + 385" -> "802" (two numbers in 100-999). The stripped response and the
  answer's digits are aligned at the right (units with units); score = the number of equal
  characters divided by the longer length.
- `reverse`: "Reverse: p l a n e t" -> "t e n a l p" (4 to 10 lowercase letters, never a
  palindrome; half the draws from a built-in list, which distinct prompts use up quickly, the rest
  random). Letters are spelled out one per token, as digits are: a subword tokenizer would hide
  them inside pieces ("silver" -> "s", "il", "ver") and make reversal a test of memorised spelling.
  The response's letters (whitespace dropped) and the answer are aligned at the left; score = the
  number of equal letters divided by the longer length.
- `constrained_line` (open-ended): "Write a line of 6 to 10 words that includes 'river' and
  'light', avoids 'dark', and ends with a word rhyming with 'night'". Score = the fraction of the
  five constraints met: word count in range, each included word present, the avoided word absent,
  the last word rhymes (a different word from the same group of the built-in rhyme table). Words
  are runs of letters (an apostrophe inside a word is kept), compared in lower case. An empty or
  letterless response scores 0 (it would otherwise "avoid" the word). Many lines score 1.
Exact match: sort and add: the stripped response (for sort, its whitespace-separated tokens)
equals the answer; reverse: its letters equal the reversed word; constrained_line: every constraint is met.

Numbers are written as plain digit strings; with a digit-splitting tokenizer each digit is a token.
A prompt belongs to the train or the validation split by a hash of its text alone, so the two are
disjoint for any seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Sequence

from lm.errors import DataError

SPLITS = ("train", "validation")
HELDOUT_SHARE = 0.25  # of the prompt hash space that belongs to 'validation'

WORDS = (
    "planet",
    "garden",
    "window",
    "silver",
    "rocket",
    "pencil",
    "forest",
    "bridge",
    "candle",
    "jungle",
    "castle",
    "orange",
    "yellow",
    "winter",
    "summer",
    "monkey",
    "basket",
    "dragon",
    "island",
    "marble",
    "button",
    "guitar",
    "harbor",
    "ladder",
    "mirror",
    "needle",
    "pepper",
    "rabbit",
    "saddle",
    "tunnel",
    "velvet",
    "wizard",
    "anchor",
    "blanket",
    "captain",
    "diamond",
    "kitchen",
    "lantern",
    "mountain",
    "notebook",
    "painter",
    "quarter",
    "thunder",
    "umbrella",
    "cloud",
    "river",
    "stone",
    "bread",
    "chair",
    "dance",
    "eagle",
    "flame",
    "grape",
    "horse",
    "lemon",
    "music",
    "ocean",
    "piano",
    "queen",
    "table",
    "tiger",
    "water",
    "zebra",
    "moon",
    "bird",
    "lake",
    "tree",
    "wind",
    "crystal",
    "elephant",
    "keyboard",
    "sunflower",
)

INCLUDE_WORDS = (
    "river",
    "light",
    "stone",
    "wind",
    "garden",
    "window",
    "mountain",
    "bird",
    "road",
    "song",
    "forest",
    "ocean",
    "candle",
    "bridge",
    "field",
    "flower",
    "cloud",
    "shadow",
)
AVOID_WORDS = ("dark", "cold", "lost", "broken", "empty", "alone", "never", "dust", "fear", "grey")
RHYMES = {
    "night": ("bright", "sight", "flight", "white", "height", "delight", "tonight", "kite"),
    "day": ("way", "stay", "play", "away", "sway", "bay", "ray", "clay"),
    "sea": ("free", "tree", "key", "bee", "knee", "glee"),
    "rain": ("again", "plain", "lane", "chain", "grain", "train"),
    "sky": ("high", "fly", "by", "sigh", "eye", "dry"),
    "home": ("foam", "roam", "dome", "comb", "loam"),
    "sun": ("run", "done", "begun", "fun", "spun", "won"),
    "heart": ("start", "part", "art", "apart", "chart"),
}
# Middles of the ideal line "the A and the B <middle> <rhyme>", cut to length.
_MIDDLES = (
    ("drift", "slowly", "toward", "a", "quiet", "and"),
    ("glow", "softly", "under", "every", "gentle", "and"),
    ("wait", "here", "for", "the", "morning", "and"),
    ("sing", "of", "something", "warm", "and", "so"),
)
_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)*")


@dataclasses.dataclass(frozen=True)
class Task:
    """A task: draws (prompt, ideal response, meta) from an rng, and grades any response."""

    generate: Callable[[random.Random], tuple[str, str, dict]]
    grade: Callable[[dict, str], tuple[float, bool]]  # (meta, response) -> (score, exact)


def positional_score(answer: Sequence, response: Sequence) -> float:
    """Number of positions i with answer[i] == response[i], over max(len(answer), len(response))
    (1 when both are empty)."""
    longest = max(len(answer), len(response))
    return sum(a == r for a, r in zip(answer, response)) / longest if longest else 1.0


def _generate_sort(rng: random.Random) -> tuple[str, str, dict]:
    numbers = rng.sample(range(100), rng.randint(5, 8))
    while numbers == sorted(numbers):
        rng.shuffle(numbers)
    return f"Sort: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers))), {"numbers": numbers}


def _grade_sort(meta: dict, response: str) -> tuple[float, bool]:
    answer = [str(n) for n in sorted(meta["numbers"])]
    tokens = response.split()
    return positional_score(answer, tokens), tokens == answer


def _generate_add(rng: random.Random) -> tuple[str, str, dict]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"Add: {a} + {b}", str(a + b), {"a": a, "b": b}


def _grade_add(meta: dict, response: str) -> tuple[float, bool]:
    answer, text = str(meta["a"] + meta["b"]), response.strip()
    return positional_score(answer[::-1], text[::-1]), text == answer


def _generate_reverse(rng: random.Random) -> tuple[str, str, dict]:
    word = ""
    while word == word[::-1]:
        if rng.random() < 0.5:
            word = rng.choice(WORDS)
        else:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
    return f"Reverse: {' '.join(word)}", " ".join(word[::-1]), {"word": word}


def _grade_reverse(meta: dict, response: str) -> tuple[float, bool]:
    answer, letters = meta["word"][::-1], "".join(response.split())
    return positional_score(answer, letters), letters == answer


def _generate_constrained_line(rng: random.Random) -> tuple[str, str, dict]:
    include = rng.sample(INCLUDE_WORDS, 2)
    avoid = rng.choice(AVOID_WORDS)
    rhyme = rng.choice(sorted(RHYMES))
    min_words = rng.randint(5, 7)
    max_words = min_words + rng.randint(2, 4)
    length = rng.randint(max(min_words, 6), max_words)
    middle = rng.choice(_MIDDLES)[: length - 6]
    ending = rng.choice([w for w in RHYMES[rhyme] if w not in include])
    line = " ".join(["the", include[0], "and", "the", include[1], *middle, ending])
    prompt = (
        f"Write a line of {min_words} to {max_words} words that includes '{include[0]}' and "
        f"'{include[1]}', avoids '{avoid}', and ends with a word rhyming with '{rhyme}'"
    )
    meta = {
        "min_words": min_words,
        "max_words": max_words,
        "include": include,
        "avoid": [avoid],
        "rhyme": rhyme,
    }
    return prompt, line, meta


def constraints_met(meta: dict, response: str) -> list[bool]:
    """[2 + len(include) + len(avoid)] booleans: length, each included, each avoided, rhyme."""
    words = _WORD_RE.findall(response.lower())
    present = set(words)
    return [
        meta["min_words"] <= len(words) <= meta["max_words"],
        *(w in present for w in meta["include"]),
        *(w not in present for w in meta["avoid"]),
        bool(words) and words[-1] in RHYMES[meta["rhyme"]],
    ]


def _grade_constrained_line(meta: dict, response: str) -> tuple[float, bool]:
    if not _WORD_RE.search(response.lower()):
        return 0.0, False
    met = constraints_met(meta, response)
    return sum(met) / len(met), all(met)


TASKS = {
    "sort": Task(_generate_sort, _grade_sort),
    "add": Task(_generate_add, _grade_add),
    "reverse": Task(_generate_reverse, _grade_reverse),
    "constrained_line": Task(_generate_constrained_line, _grade_constrained_line),
}


def parse_tasks(task_names: str | Sequence[str]) -> list[str]:
    """'sort, add' or ['sort', 'add'] -> ['sort', 'add']; DataError for an unknown or empty list."""
    names = [n.strip() for n in (task_names.split(",") if isinstance(task_names, str) else task_names)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise DataError(
            f"config.data.tasks: {', '.join(map(repr, unknown)) or 'empty'}; "
            f"expected a comma-separated list of {', '.join(TASKS)}"
        )
    return names


def split_of(prompt: str) -> str:
    """'train' or 'validation': a fixed function of the prompt text (HELDOUT_SHARE held out)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64
    return "validation" if bucket < HELDOUT_SHARE else "train"


def make_examples(task_names: str | Sequence[str], num: int, seed: int, split: str) -> list[dict]:
    """`num` examples of `split`, the tasks taken in turn: dicts {task, prompt, response, meta}.

    meta is a JSON string (what `grade` needs). Each task draws from its own rng seeded by
    (seed, task) and keeps the distinct prompts that hash into `split`; deterministic.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = parse_tasks(task_names)
    wanted = {name: num // len(names) + (k < num % len(names)) for k, name in enumerate(names)}
    drawn = {name: _draw(name, wanted[name], seed, split) for name in names}
    return [drawn[names[i % len(names)]][i // len(names)] for i in range(num)]


def _draw(task: str, num: int, seed: int, split: str) -> list[dict]:
    """`num` distinct examples of one task whose prompts hash into `split`."""
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}/{task}".encode()).digest()[:8], "big"))
    examples, seen = [], set()
    for _ in range(100 * num + 1000):
        if len(examples) == num:
            break
        prompt, response, meta = TASKS[task].generate(rng)
        if prompt not in seen and split_of(prompt) == split:
            seen.add(prompt)
            examples.append({"task": task, "prompt": prompt, "response": response, "meta": json.dumps(meta)})
    if len(examples) < num:
        raise DataError(
            f"graded task {task!r}: found only {len(examples)} distinct {split} prompts, wanted {num}"
        )
    return examples


def grade(task: str, meta: str | dict, response_text: str) -> dict:
    """Scores one response: {'score': float in [0, 1], 'exact': bool}; meta as made by make_examples."""
    score, exact = TASKS[task].grade(json.loads(meta) if isinstance(meta, str) else meta, response_text)
    return {"score": float(score), "exact": bool(exact)}


def grade_batch(examples: Sequence[dict], responses: Sequence[str]) -> dict[str, float]:
    """Means over [n] examples and their [n] responses: score, exact, and score_<task>, exact_<task>."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    by_task: dict[str, list[dict]] = {}
    for example, response in zip(examples, responses):
        by_task.setdefault(example["task"], []).append(grade(example["task"], example["meta"], response))
    every = [g for grades in by_task.values() for g in grades]
    result = _means(every, "")
    for task, grades in sorted(by_task.items()):
        result.update(_means(grades, f"_{task}"))
    return result


def _means(grades: list[dict], suffix: str) -> dict[str, float]:
    """{'score<suffix>': mean score, 'exact<suffix>': fraction exact} (0 for no grades)."""
    n = max(len(grades), 1)
    return {
        f"score{suffix}": sum(g["score"] for g in grades) / n,
        f"exact{suffix}": sum(g["exact"] for g in grades) / n,
    }
