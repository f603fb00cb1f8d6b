"""An n-gram language model with interpolated modified Kneser-Ney smoothing (Chen & Goodman 1998).

Counted and scored with numpy over the packed token streams of `lm.data.pipeline` (every document
is [BOS] + ids + [EOS]); nothing loops over tokens in Python except the ARPA text.

Conventions (the same as KenLM's `lmplz` and SRILM where they have one):
- n-grams never cross documents. BOS plays `<s>` (context only, never predicted) and EOS plays
  `</s>` (predicted). Near the start of a document the context is what the document has: the
  first word after `<s>` is predicted by the bigram level, the next by the trigram level, and so on.
- The vocabulary V is every id below the tokenizer's vocab_size except BOS and pad (EOS is in V).
  Ids never seen in training keep a share of the uniform distribution the unigram level
  interpolates with, so every id of V has a positive probability and the distribution over V sums
  to 1 for any context. Ids outside V have probability 0.
- The highest order uses raw counts; a lower order uses continuation counts N1+(. g) (the number of
  distinct words seen before g), except n-grams that begin with `<s>`, which keep their raw counts
  (nothing precedes `<s>`).
- Each order n has three discounts from the counts-of-counts n1..n4 of its (adjusted) counts:
  Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. Where they cannot be
  computed (n1, n2 or n3 is zero) or one falls outside [0, j] (small or artificial corpora), that
  order uses KenLM's `--discount_fallback` defaults D = (0.5, 1, 1.5) instead.
- p_n(w | h) = (c(hw) - D(c(hw))) / c(h.) + gamma(h) p_{n-1}(w | h') with h' = h minus its first word
  and gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / c(h.); a context never seen followed by a
  word at order n backs off fully: p_n(w | h) = p_{n-1}(w | h'). The unigram level interpolates with
  the uniform distribution over V.

Storage. The n-grams of order n are numbered by their rank in a sorted int64 key array:
key = id(prefix (n-1)-gram) * vocab_size + last id, where order 1's ids are the token ids. Keys
stay far below 2**63 for any vocabulary (the number of (n-1)-grams times vocab_size), and all the
n-grams of one context are adjacent.

ARPA files (`write_arpa`) write each id of V as its decimal number, BOS and EOS as `<s>` and
`</s>`. Every id of V is listed among the unigrams (with its share of the uniform mass), so the
`<unk>` entry that KenLM requires stands only for ids outside V and gets log10 probability -99
(probability 0 in this model), like `<s>`.
"""

import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np

from lm.errors import DataError

FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults for D1, D2, D3+
ARPA_ZERO = -99.0  # log10 "probability" of <s> and <unk> in ARPA files
_ARPA_CHUNK = 1 << 18  # lines formatted per write


@dataclasses.dataclass
class Level:
    """The n-grams of one order n and what the estimator derived from them.

    keys: [M_n] int64 sorted, id(prefix (n-1)-gram) * vocab_size + last id; None at order 1,
      whose ids are the token ids (M_1 = vocab_size).
    counts: [M_n] int64 adjusted counts (raw at the highest order and for n-grams that begin with
      `<s>`, continuation counts otherwise; order 1: zero outside V).
    suffix: [M_n] int64 id at order n-1 of each n-gram minus its first word; None at order 1.
    discounts: [4] float64 D(0) = 0, D1, D2, D3+.
    fallback: whether the discounts are the fallback ones (see the module docstring).
    ctx_total: [M_{n-1}] float64 c(h.) per context h, the sum of the adjusted counts of the n-grams
      that extend it (order 1: [1], the sum over V).
    ctx_gamma: [M_{n-1}] float64 gamma(h) (0 where c(h.) = 0; order 1: [1]).
    probs: [M_n] float64 p_n(w | h) of every stored n-gram hw (order 1: [vocab_size], 0 outside V).
    """

    keys: np.ndarray | None
    counts: np.ndarray
    suffix: np.ndarray | None
    discounts: np.ndarray
    fallback: bool
    ctx_total: np.ndarray
    ctx_gamma: np.ndarray
    probs: np.ndarray

    @property
    def size(self) -> int:
        """M_n: how many n-grams this order stores (order 1: vocab_size ids)."""
        return len(self.counts)


@dataclasses.dataclass
class KNModel:
    """An interpolated modified Kneser-Ney model; levels[n - 1] holds order n."""

    order: int
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    levels: list[Level]

    @property
    def in_vocab(self) -> np.ndarray:
        """[vocab_size] bool: the ids of V (all but BOS and pad)."""
        return vocab_mask(self.vocab_size, self.bos_id, self.pad_id)


def vocab_mask(vocab_size: int, bos_id: int, pad_id: int) -> np.ndarray:
    """[vocab_size] bool: True for the ids the model predicts (every id but BOS and pad)."""
    mask = np.ones(vocab_size, dtype=bool)
    mask[[bos_id, pad_id]] = False
    return mask


def document_index(tokens: np.ndarray, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> np.ndarray:
    """[T] int64: the document each position belongs to (0, 1, ...), for a stream [T] of
    [BOS] + ids + [EOS] documents; DataError where the stream is not one."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise DataError("empty token stream: need at least one [BOS] ... [EOS] document")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise DataError(f"token ids outside [0, {vocab_size}) in the stream")
    if np.any(tokens == pad_id) and pad_id not in (bos_id, eos_id):
        raise DataError(f"pad id {pad_id} inside the token stream")
    starts, ends = np.flatnonzero(tokens == bos_id), np.flatnonzero(tokens == eos_id)
    if (
        tokens[0] != bos_id
        or tokens[-1] != eos_id
        or len(starts) != len(ends)
        or np.any(starts[1:] != ends[:-1] + 1)
    ):
        raise DataError("the token stream is not a sequence of [BOS] + ids + [EOS] documents")
    return np.cumsum(tokens == bos_id, dtype=np.int64) - 1


def _check_keys_fit(num_prefixes: int, vocab_size: int) -> None:
    """Raises ValueError when id * vocab_size + id could overflow int64."""
    if num_prefixes * vocab_size >= 2**63:
        raise ValueError(f"{num_prefixes} n-grams x vocab {vocab_size} overflow int64 keys")


def count_ngrams(tokens: np.ndarray, doc: np.ndarray, order: int, vocab_size: int) -> list[dict]:
    """Distinct n-grams of orders 2..`order` inside the documents of `tokens` [T] (`doc` [T] from
    `document_index`), each order a dict of
    keys [M_n] int64 (sorted; see the module docstring), raw [M_n] int64 counts, first [M_n] int64
    (first token of each n-gram), suffix [M_n] int64 (id at order n-1 of the n-gram minus its first
    word). Index 0 of the list is order 2."""
    tokens = np.asarray(tokens).astype(np.int64)
    prev = tokens  # positional ids of the (n-1)-grams starting at each position (-1: none)
    num_prev = vocab_size
    out = []
    for n in range(2, order + 1):
        _check_keys_fit(num_prev, vocab_size)
        length = len(tokens) - n + 1
        if length <= 0:
            out.append({k: np.zeros(0, np.int64) for k in ("keys", "raw", "first", "suffix")})
            prev, num_prev = np.zeros(0, np.int64), 0
            continue
        pos = np.flatnonzero(doc[:length] == doc[n - 1 :])
        keys = prev[pos] * vocab_size + tokens[pos + n - 1]
        uniq, first, inverse, raw = np.unique(
            keys, return_index=True, return_inverse=True, return_counts=True
        )
        start = pos[first]
        out.append(
            {"keys": uniq, "raw": raw.astype(np.int64), "first": tokens[start], "suffix": prev[start + 1]}
        )
        ids = np.full(length, -1, np.int64)
        ids[pos] = inverse.reshape(-1)
        prev, num_prev = ids, len(uniq)
    return out


def kn_discounts(counts: np.ndarray) -> tuple[np.ndarray, bool]:
    """Modified Kneser-Ney discounts from one order's adjusted counts [M] (zeros ignored):
    ([4] float64 D(0) = 0, D1, D2, D3+; whether the fallback (0.5, 1, 1.5) replaced them)."""
    n = np.bincount(np.minimum(counts[counts > 0], 5), minlength=6)[:5].astype(np.float64)
    fallback = np.array([0.0, *FALLBACK_DISCOUNTS])
    if n[1] == 0 or n[2] == 0 or n[3] == 0:
        return fallback, True
    y = n[1] / (n[1] + 2 * n[2])
    d = np.array([0.0] + [j - (j + 1) * y * n[j + 1] / n[j] for j in (1, 2, 3)])
    if np.any(d[1:] < 0) or np.any(d[1:] > np.arange(1, 4)):
        return fallback, True
    return d, False


def _discount(counts: np.ndarray, discounts: np.ndarray) -> np.ndarray:
    """[M] float64 D(c) for adjusted counts [M] (0 for c = 0)."""
    return discounts[np.minimum(counts, 3)]


def _context_stats(ctx: np.ndarray, counts: np.ndarray, discounts: np.ndarray, num_ctx: int):
    """(c(h.) [num_ctx], gamma(h) [num_ctx]) from each n-gram's context id [M] and adjusted count [M]."""
    total = np.bincount(ctx, weights=counts, minlength=num_ctx)
    mass = np.bincount(ctx, weights=_discount(counts, discounts), minlength=num_ctx)
    gamma = np.divide(mass, total, out=np.zeros_like(mass), where=total > 0)
    return total, gamma


def adjusted_counts(
    tokens: np.ndarray, counted: list[dict], order: int, vocab_size: int, bos_id: int, pad_id: int
) -> list[np.ndarray]:
    """[order] arrays, index n - 1 holding order n's [M_n] int64 adjusted counts: raw at the highest
    order and for n-grams that begin with `<s>`, continuation counts N1+(. g) below it; order 1 is
    indexed by token id ([vocab_size], zero outside V). `counted` is `count_ngrams`'s list."""
    out = []
    for n in range(1, order + 1):
        if n == order:
            raw = np.bincount(tokens, minlength=vocab_size) if n == 1 else counted[n - 2]["raw"]
            out.append(raw.astype(np.int64))
            continue
        size = vocab_size if n == 1 else len(counted[n - 2]["keys"])
        cont = np.bincount(counted[n - 1]["suffix"], minlength=size).astype(np.int64)
        if n > 1:
            cont = np.where(counted[n - 2]["first"] == bos_id, counted[n - 2]["raw"], cont)
        out.append(cont)
    out[0] = np.where(vocab_mask(vocab_size, bos_id, pad_id), out[0], 0)
    return out


def unigram_level(counts: np.ndarray, in_vocab: np.ndarray) -> Level:
    """Order 1 from its adjusted counts [vocab_size] (zero outside V) and the V mask [vocab_size]:
    discounted counts interpolated with the uniform distribution over V."""
    discounts, fallback = kn_discounts(counts)
    total = float(counts.sum())
    if total <= 0:
        raise DataError("no predicted tokens in the training stream")
    reserved = _discount(counts, discounts)
    gamma = float(reserved.sum()) / total
    probs = np.where(in_vocab, (counts - reserved) / total + gamma / in_vocab.sum(), 0.0)
    return Level(None, counts, None, discounts, fallback, np.array([total]), np.array([gamma]), probs)


def next_level(counted: dict, counts: np.ndarray, below: Level, vocab_size: int) -> Level:
    """Order n from `count_ngrams`'s dict for it, its adjusted counts [M_n] and order n - 1's Level:
    p_n(w | h) = (c(hw) - D(c(hw))) / c(h.) + gamma(h) p_{n-1}(w | h') for every stored hw."""
    discounts, fallback = kn_discounts(counts)
    ctx = counted["keys"] // vocab_size
    total, gamma = _context_stats(ctx, counts, discounts, below.size)
    own = (counts - _discount(counts, discounts)) / np.maximum(total[ctx], 1)
    probs = own + gamma[ctx] * below.probs[counted["suffix"]]
    return Level(counted["keys"], counts, counted["suffix"], discounts, fallback, total, gamma, probs)


def estimate(
    tokens: np.ndarray, order: int, vocab_size: int, bos_id: int, eos_id: int, pad_id: int
) -> KNModel:
    """Counts the documents of a token stream [T] ([BOS] + ids + [EOS] each) and estimates the
    order-`order` model over V = every id below vocab_size but BOS and pad."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    tokens = np.asarray(tokens).astype(np.int64)
    doc = document_index(tokens, vocab_size, bos_id, eos_id, pad_id)
    counted = count_ngrams(tokens, doc, order, vocab_size)
    adjusted = adjusted_counts(tokens, counted, order, vocab_size, bos_id, pad_id)
    levels = [unigram_level(adjusted[0], vocab_mask(vocab_size, bos_id, pad_id))]
    for n in range(2, order + 1):
        levels.append(next_level(counted[n - 2], adjusted[n - 1], levels[-1], vocab_size))
    return KNModel(order, vocab_size, bos_id, eos_id, pad_id, levels)


def _extend(keys: np.ndarray, ids: np.ndarray, words: np.ndarray, vocab_size: int) -> np.ndarray:
    """[B] ids at order n of the (n-1)-grams `ids` [B] (-1: absent) followed by `words` [B]
    (-1: none), looked up in that order's sorted `keys`; -1 where the n-gram was not seen."""
    ok = (ids >= 0) & (words >= 0)
    if len(keys) == 0:
        return np.full(len(ids), -1, np.int64)
    query = np.where(ok, ids, 0) * vocab_size + np.where(ok, words, 0)
    pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(ok & (keys[pos] == query), pos, -1)


def lookup(model: KNModel, grams: np.ndarray) -> np.ndarray:
    """[B] ids at order n of the n-grams `grams` [B, n] (token ids, -1 for none), -1 where any
    token is -1 or the n-gram was not seen in training."""
    grams = np.asarray(grams, dtype=np.int64)
    first = grams[:, 0]
    ids = np.where((first >= 0) & (first < model.vocab_size), first, -1)
    for k in range(1, grams.shape[1]):
        ids = _extend(model.levels[k].keys, ids, grams[:, k], model.vocab_size)
    return ids


def log_probs(model: KNModel, grams: np.ndarray) -> np.ndarray:
    """[B] natural-log p(w | h) for rows [B, model.order] of context h (the first order - 1
    columns, left-padded with -1 where the document has fewer words; `<s>` starts a short one)
    and word w (the last column); -inf for words outside V. Interpolates order by order from the
    counts, independently of the stored `Level.probs` that ARPA files are written from."""
    grams = np.asarray(grams, dtype=np.int64)
    order = model.order
    if grams.ndim != 2 or grams.shape[1] != order:
        raise ValueError(f"grams must be [B, {order}], got {grams.shape}")
    words = grams[:, -1]
    valid = (words >= 0) & (words < model.vocab_size)
    valid[valid] &= model.in_vocab[words[valid]]
    words = np.where(valid, words, -1)
    p = np.where(valid, model.levels[0].probs[np.maximum(words, 0)], 0.0)
    for n in range(2, order + 1):
        level = model.levels[n - 1]
        ctx = lookup(model, grams[:, order - n : order - 1])
        total = np.where(ctx >= 0, level.ctx_total[np.maximum(ctx, 0)], 0.0)
        seen = total > 0
        gram = _extend(level.keys, ctx, words, model.vocab_size)
        counts = np.where(gram >= 0, level.counts[np.maximum(gram, 0)], 0)
        own = (counts - _discount(counts, level.discounts)) / np.where(seen, total, 1.0)
        p = np.where(seen, own + level.ctx_gamma[np.maximum(ctx, 0)] * p, p)
    with np.errstate(divide="ignore"):
        return np.log(p)


def stream_grams(tokens: np.ndarray, doc: np.ndarray, order: int, bos_id: int) -> np.ndarray:
    """[P, order] rows for `log_probs`, one per predicted position of the stream `tokens` [T]
    (every position but the `<s>` ones), contexts cut at the document start and left-padded with -1."""
    tokens = np.asarray(tokens).astype(np.int64)
    pos = np.flatnonzero(tokens != bos_id)
    grams = np.full((len(pos), order), -1, np.int64)
    grams[:, -1] = tokens[pos]
    for back in range(1, order):
        src = pos - back
        ok = (src >= 0) & (doc[np.maximum(src, 0)] == doc[pos])
        grams[ok, order - 1 - back] = tokens[src[ok]]
    return grams


def evaluate(model: KNModel, tokens: np.ndarray, token_bytes: np.ndarray) -> dict:
    """Held-out figures of `model` on a stream `tokens` [T]: bits_per_byte (summed -log2 p of every
    predicted token over the UTF-8 bytes they stand for, `token_bytes` [vocab_size]),
    nats_per_token, heldout_tokens (predicted tokens) and heldout_bytes."""
    tokens = np.asarray(tokens).astype(np.int64)
    doc = document_index(tokens, model.vocab_size, model.bos_id, model.eos_id, model.pad_id)
    grams = stream_grams(tokens, doc, model.order, model.bos_id)
    nats = -float(np.sum(log_probs(model, grams)))
    num_bytes = int(np.asarray(token_bytes)[grams[:, -1]].sum())
    return {
        "bits_per_byte": nats / math.log(2) / max(num_bytes, 1),
        "nats_per_token": nats / max(len(grams), 1),
        "heldout_tokens": len(grams),
        "heldout_bytes": num_bytes,
    }


def arpa_words(model: KNModel) -> list[str]:
    """[vocab_size] ARPA word per id: `<s>` and `</s>` for BOS and EOS, the decimal id otherwise."""
    names = [str(i) for i in range(model.vocab_size)]
    names[model.bos_id], names[model.eos_id] = "<s>", "</s>"
    return names


def _arpa_lines(log_p: np.ndarray, texts: list[str], log_bow: np.ndarray | None) -> str:
    """ARPA lines for [M] log10 probabilities, [M] n-gram texts and [M] log10 backoffs (NaN or
    None: no backoff column)."""
    if log_bow is None:
        return "".join(f"{p:.6f}\t{t}\n" for p, t in zip(log_p.tolist(), texts))
    return "".join(
        f"{p:.6f}\t{t}\n" if b != b else f"{p:.6f}\t{t}\t{b:.6f}\n"
        for p, t, b in zip(log_p.tolist(), texts, log_bow.tolist())
    )


def _log_backoffs(model: KNModel, n: int) -> np.ndarray | None:
    """[M_n] log10 gamma of each n-gram as a context of order n + 1, NaN where it is none; None at
    the highest order."""
    if n == model.order:
        return None
    above = model.levels[n]
    with np.errstate(divide="ignore"):
        return np.where(above.ctx_total > 0, np.log10(above.ctx_gamma), np.nan)


def write_arpa(model: KNModel, path: str | os.PathLike) -> dict:
    """Writes the model as an ARPA file at `path` (atomically, `lm.metrics.atomic_path`) and returns
    {"num_ngrams": [M_1, ..., M_order]} as written (M_1 counts `<s>` and `<unk>`)."""
    from lm.metrics import atomic_path  # the project's atomic writer; lm.metrics imports jax

    names = arpa_words(model)
    vocab = np.flatnonzero(model.in_vocab)
    uni_ids = np.concatenate([[model.bos_id], vocab])
    sizes = [len(uni_ids) + 1] + [model.levels[n - 1].size for n in range(2, model.order + 1)]
    with atomic_path(path) as tmp, open(tmp, "w", encoding="ascii") as f:
        f.write("\\data\\\n" + "".join(f"ngram {n}={m}\n" for n, m in enumerate(sizes, 1)))
        f.write(f"\n\\1-grams:\n{ARPA_ZERO:.6f}\t<unk>\n")
        with np.errstate(divide="ignore"):
            log_p = np.log10(model.levels[0].probs[uni_ids])
        log_p[0] = ARPA_ZERO
        bow = _log_backoffs(model, 1)
        f.write(_arpa_lines(log_p, [names[i] for i in uni_ids], None if bow is None else bow[uni_ids]))
        texts = names
        for n in range(2, model.order + 1):
            level = model.levels[n - 1]
            f.write(f"\n\\{n}-grams:\n")
            log_p = np.log10(level.probs)
            bow = _log_backoffs(model, n)
            ctx, last = np.divmod(level.keys, model.vocab_size)
            new_texts = [f"{texts[c]} {names[w]}" for c, w in zip(ctx.tolist(), last.tolist())]
            for lo in range(0, level.size, _ARPA_CHUNK):
                hi = lo + _ARPA_CHUNK
                f.write(_arpa_lines(log_p[lo:hi], new_texts[lo:hi], None if bow is None else bow[lo:hi]))
            texts = new_texts
        f.write("\n\\end\\\n")
    return {"num_ngrams": sizes}


@dataclasses.dataclass
class Arpa:
    """An ARPA model as read back: entries maps a tuple of words to (log10 p, log10 backoff)."""

    order: int
    entries: dict[tuple[str, ...], tuple[float, float]]


def read_arpa(path: str | os.PathLike) -> Arpa:
    """Reads an ARPA file (for checks on small models: a dict with one entry per n-gram)."""
    entries: dict[tuple[str, ...], tuple[float, float]] = {}
    declared: dict[int, int] = {}
    section = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line == "\\data\\":
                continue
            if line == "\\end\\":
                break
            if line.startswith("ngram "):
                n, m = line[6:].split("=")
                declared[int(n)] = int(m)
            elif line.startswith("\\") and line.endswith("-grams:"):
                section = int(line[1:].split("-")[0])
            else:
                fields = line.split("\t") if "\t" in line else line.split()
                if "\t" in line:
                    words = tuple(fields[1].split())
                    bow = float(fields[2]) if len(fields) > 2 else 0.0
                else:
                    words = tuple(fields[1 : 1 + section])
                    bow = float(fields[1 + section]) if len(fields) > 1 + section else 0.0
                if len(words) != section:
                    raise DataError(f"{path}: a {len(words)}-gram in the {section}-grams section")
                entries[words] = (float(fields[0]), bow)
    found = {n: 0 for n in declared}
    for words in entries:
        found[len(words)] = found.get(len(words), 0) + 1
    if found != declared:
        raise DataError(f"{path}: header declares {declared} n-grams, sections hold {found}")
    return Arpa(max(declared), entries)


def arpa_log10_prob(arpa: Arpa, context: Sequence[str], word: str) -> float:
    """log10 p(word | context) with ARPA backoff semantics: p(h w) if listed, else
    backoff(h) * p(w | h minus its first word); a word not among the unigrams is `<unk>`."""
    if (word,) not in arpa.entries:
        word = "<unk>"
    context = tuple(context)[-(arpa.order - 1) :] if arpa.order > 1 else ()
    backoff = 0.0
    while (*context, word) not in arpa.entries:
        backoff += arpa.entries.get(context, (0.0, 0.0))[1]
        context = context[1:]
    return arpa.entries[(*context, word)][0] + backoff
