"""The Kneser-Ney n-gram model (lm/ngram.py, tools/ngram.py) on tiny synthetic corpora."""

import math
from collections import Counter, defaultdict

import numpy as np
import pytest

from lm import ngram
from lm.errors import DataError
from tools import ngram as ngram_tool

PAD, BOS, EOS = 0, 1, 2


def stream(docs) -> np.ndarray:
    """[T] int64: each document wrapped as [BOS] + ids + [EOS], concatenated."""
    return np.concatenate([np.r_[BOS, np.asarray(d, np.int64), EOS] for d in docs]).astype(np.int64)


def random_docs(rng, num_docs: int, words: int, max_len: int) -> list[list[int]]:
    """Documents over ids 3 .. 3 + words - 1, skewed so that some n-grams repeat."""
    weights = 1.0 / np.arange(1, words + 1)
    weights /= weights.sum()
    return [
        list(rng.choice(np.arange(3, 3 + words), size=rng.integers(0, max_len + 1), p=weights))
        for _ in range(num_docs)
    ]


# ---------------------------------------------------------------------------------------------
# A deliberately naive reference, written from Chen & Goodman's formulas with dicts and loops.
# ---------------------------------------------------------------------------------------------


class NaiveKN:
    def __init__(self, docs, order, vocab_size):
        self.order = order
        self.vocab = [w for w in range(vocab_size) if w not in (BOS, PAD)]
        sentences = [[BOS] + list(map(int, d)) + [EOS] for d in docs]
        raw = {n: Counter() for n in range(1, order + 1)}
        for s in sentences:
            for n in range(1, order + 1):
                for i in range(len(s) - n + 1):
                    raw[n][tuple(s[i : i + n])] += 1
        self.count = {order: dict(raw[order])}
        for n in range(1, order):
            left = defaultdict(set)
            for gram in raw[n + 1]:
                left[gram[1:]].add(gram[0])
            self.count[n] = {g: (c if g[0] == BOS else len(left[g])) for g, c in raw[n].items()}
        self.count[1].pop((BOS,), None)  # <s> is never predicted
        self.discount = {n: self.discounts(list(self.count[n].values())) for n in self.count}

    @staticmethod
    def discounts(counts):
        n1, n2, n3, n4 = (sum(1 for c in counts if c == j) for j in (1, 2, 3, 4))
        if n1 == 0 or n2 == 0 or n3 == 0:
            return {1: 0.5, 2: 1.0, 3: 1.5}
        y = n1 / (n1 + 2 * n2)
        d = {1: 1 - 2 * y * n2 / n1, 2: 2 - 3 * y * n3 / n2, 3: 3 - 4 * y * n4 / n3}
        if any(not 0 <= d[j] <= j for j in d):
            return {1: 0.5, 2: 1.0, 3: 1.5}
        return d

    def d(self, n, c):
        return 0.0 if c == 0 else self.discount[n][min(c, 3)]

    def p(self, n, h, w):
        """p_n(w | h), len(h) = n - 1."""
        if n == 1:
            total = sum(self.count[1].values())
            gamma = sum(self.d(1, c) for c in self.count[1].values()) / total
            c = self.count[1].get((w,), 0)
            return (c - self.d(1, c)) / total + gamma / len(self.vocab)
        following = {g[-1]: c for g, c in self.count[n].items() if g[:-1] == h}
        total = sum(following.values())
        if total == 0:
            return self.p(n - 1, h[1:], w)
        big_n = [sum(1 for c in following.values() if c == j) for j in (1, 2)]
        big_n.append(sum(1 for c in following.values() if c >= 3))
        gamma = sum(self.discount[n][j + 1] * big_n[j] for j in range(3)) / total
        c = following.get(w, 0)
        return (c - self.d(n, c)) / total + gamma * self.p(n - 1, h[1:], w)

    def prob(self, context, w):
        """p(w | the document's words before it), context cut to order - 1 words."""
        h = tuple(context)[-(self.order - 1) :] if self.order > 1 else ()
        return self.p(len(h) + 1, h, w)


def grams_for(order, context, words) -> np.ndarray:
    """[len(words), order] rows for ngram.log_probs: `context` (cut to order - 1, left-padded with
    -1) followed by each word."""
    context = list(context)[-(order - 1) :] if order > 1 else []
    g = np.full((len(words), order), -1, np.int64)
    if context:
        g[:, order - 1 - len(context) : order - 1] = context
    g[:, -1] = words
    return g


def sample_contexts(rng, docs, order, count, vocab_size):
    """Contexts as the model sees them: prefixes of training documents (from <s>), random word
    sequences (mostly unseen) and random sequences after <s>."""
    out = []
    for _ in range(count):
        kind = rng.integers(3)
        if kind == 0:
            d = docs[rng.integers(len(docs))]
            out.append([BOS] + list(d[: rng.integers(0, len(d) + 1)]))
        elif kind == 1:
            out.append(list(rng.integers(3, vocab_size, size=rng.integers(0, order + 1))))
        else:
            out.append([BOS] + list(rng.integers(3, vocab_size, size=rng.integers(0, order))))
    return [[int(t) for t in c][-(order - 1) :] if order > 1 else [] for c in out]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 40, 6, 14) + [[]]  # ids 3..8 and an empty document; 9, 10 never seen
    return docs, 11


def test_matches_naive_reference_orders_1_to_4(corpus):
    docs, vocab_size = corpus
    rng = np.random.default_rng(1)
    words = [w for w in range(vocab_size) if w not in (BOS, PAD)]
    fallbacks = set()
    for order in (1, 2, 3, 4):
        model = ngram.estimate(stream(docs), order, vocab_size, BOS, EOS, PAD)
        ref = NaiveKN(docs, order, vocab_size)
        for n, level in enumerate(model.levels, 1):
            np.testing.assert_allclose(
                level.discounts[1:], [ref.discount[n][j] for j in (1, 2, 3)], rtol=1e-12
            )
            fallbacks.add(level.fallback)
        for context in sample_contexts(rng, docs, order, 25, vocab_size):
            ours = np.exp(ngram.log_probs(model, grams_for(order, context, words)))
            theirs = [ref.prob(context, w) for w in words]
            np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-15)
    assert fallbacks == {True, False}  # both the formula and the fallback were exercised


def test_bigram_by_hand():
    # vocab_size 7: V = {</s>=2, a=3, b=4, c=5, 6} (|V| = 5; 6 never occurs). Documents "a b",
    # "a c", "b": <s> a b </s> / <s> a c </s> / <s> b </s>.
    # Bigrams (raw): <s>a 2, <s>b 1, ab 1, ac 1, b</s> 2, c</s> 1 -> n1 = 4, n2 = 2, n3 = 0: fallback
    # D = (0.5, 1, 1.5). Unigram continuation counts: a 1 {<s>}, b 2 {<s>, a}, c 1 {a}, </s> 2 {b, c};
    # n3 = 0 again: fallback. Total 6, gamma = (0.5*2 + 1*2)/6 = 1/2, so
    # p1(a) = p1(c) = 0.5/6 + 0.5/5 = 11/60, p1(b) = p1(</s>) = 1/6 + 1/10 = 16/60, p1(6) = 6/60.
    # Context a: ab 1, ac 1, total 2, gamma = 0.5*2/2 = 1/2:
    #   p(b | a) = 0.5/2 + 0.5 * 16/60 = 23/60,  p(</s> | a) = 0.5 * 16/60 = 8/60.
    # Context <s>: <s>a 2, <s>b 1, total 3, gamma = (1 + 0.5)/3 = 1/2:
    #   p(a | <s>) = (2 - 1)/3 + 0.5 * 11/60 = 51/120.
    # Context 6 (never seen): p(b | 6) = p1(b) = 16/60.
    a, b, c = 3, 4, 5
    model = ngram.estimate(stream([[a, b], [a, c], [b]]), 2, 7, BOS, EOS, PAD)
    np.testing.assert_allclose(model.levels[0].probs[[EOS, a, b, c, 6]], np.array([16, 11, 16, 11, 6]) / 60)
    grams = np.array([[a, b], [a, EOS], [BOS, a], [6, b]])
    np.testing.assert_allclose(np.exp(ngram.log_probs(model, grams)), [23 / 60, 8 / 60, 51 / 120, 16 / 60])


def test_discounts_formula_and_fallbacks():
    # n1..n4 = 4, 2, 1, 1: Y = 4/8, D1 = 1 - 2Y*2/4 = 0.5, D2 = 2 - 3Y*1/2 = 1.25, D3+ = 3 - 4Y*1/1 = 1.
    d, fallback = ngram.kn_discounts(np.array([1, 1, 1, 1, 2, 2, 3, 4, 7, 0]))
    assert not fallback and d.tolist() == [0.0, 0.5, 1.25, 1.0]
    for counts in ([1, 1, 2, 2], [1, 2, 3, 3, 3, 3, 3]):  # no count of 3; D2 = 2 - 3(1/3)*5 < 0
        d, fallback = ngram.kn_discounts(np.array(counts))
        assert fallback and d.tolist() == [0.0, 0.5, 1.0, 1.5]


def test_sums_to_one_for_any_context(corpus):
    docs, vocab_size = corpus
    rng = np.random.default_rng(2)
    words = np.flatnonzero(ngram.vocab_mask(vocab_size, BOS, PAD))
    for order in (1, 2, 3, 4, 5):
        model = ngram.estimate(stream(docs), order, vocab_size, BOS, EOS, PAD)
        for context in sample_contexts(rng, docs, order, 30, vocab_size):
            p = np.exp(ngram.log_probs(model, grams_for(order, context, words)))
            assert np.all(p > 0) and abs(p.sum() - 1) < 1e-6, (order, context, p.sum())
        outside = np.exp(ngram.log_probs(model, grams_for(order, [BOS], [BOS, PAD])))
        assert outside.tolist() == [0.0, 0.0]


def test_ngrams_stay_inside_documents():
    docs = [[3, 4], [5], [], [4, 3, 5]]
    model = ngram.estimate(stream(docs), 3, 6, BOS, EOS, PAD)
    words = [(i,) for i in range(6)]  # order 1's ids are the token ids
    for n in (2, 3):
        prefix, last = np.divmod(model.levels[n - 1].keys, 6)
        words = [words[p] + (w,) for p, w in zip(prefix.tolist(), last.tolist())]
        expected = {
            tuple(s[i : i + n]) for d in docs for s in [[BOS, *d, EOS]] for i in range(len(s) - n + 1)
        }
        assert sorted(words) == sorted(expected)


def test_large_vocabulary_keys():
    # Ids near 2**20: five of them need 100 bits, more than one uint64; keys stay int64.
    rng = np.random.default_rng(3)
    vocab_size = 1 << 20
    ids = vocab_size - 1 - np.arange(6)
    docs = [list(rng.choice(ids, size=rng.integers(1, 9))) for _ in range(20)]
    model = ngram.estimate(stream(docs), 5, vocab_size, BOS, EOS, PAD)
    ref = NaiveKN(docs, 5, vocab_size)
    for context in sample_contexts(rng, docs, 5, 10, 9):
        context = [t if t in (BOS,) else int(ids[t % 6]) for t in context]
        words = [int(w) for w in ids] + [EOS, 7]
        ours = np.exp(ngram.log_probs(model, grams_for(5, context, words)))
        np.testing.assert_allclose(ours, [ref.prob(context, w) for w in words], rtol=1e-9)


def test_evaluate_bits_per_byte(corpus):
    docs, vocab_size = corpus
    held = [[3, 4, 9], [], [10, 3]]
    token_bytes = np.r_[0, 0, 0, np.arange(1, vocab_size - 2)]  # id i >= 3 stands for i - 2 bytes
    model = ngram.estimate(stream(docs), 3, vocab_size, BOS, EOS, PAD)
    got = ngram.evaluate(model, stream(held), token_bytes)
    ref = NaiveKN(docs, 3, vocab_size)
    bits = -sum(math.log2(ref.prob([BOS, *d][: i + 1], w)) for d in held for i, w in enumerate(d + [EOS]))
    num_bytes = sum(token_bytes[w] for d in held for w in d)
    assert got["heldout_tokens"] == (3 + 1) + (0 + 1) + (2 + 1) and got["heldout_bytes"] == num_bytes
    assert got["bits_per_byte"] == pytest.approx(bits / num_bytes, rel=1e-9)
    assert got["nats_per_token"] == pytest.approx(bits * math.log(2) / got["heldout_tokens"], rel=1e-9)


def test_rejects_malformed_streams():
    for bad in ([3, 4, EOS], [BOS, 3, 4], [BOS, 3, PAD, EOS], [BOS, 3, BOS, 4, EOS], [BOS, 3, 99, EOS]):
        with pytest.raises(DataError):
            ngram.estimate(np.array(bad), 2, 11, BOS, EOS, PAD)


@pytest.mark.parametrize("order", [1, 3, 5])
def test_arpa_round_trip(corpus, tmp_path, order):
    docs, vocab_size = corpus
    rng = np.random.default_rng(4)
    model = ngram.estimate(stream(docs), order, vocab_size, BOS, EOS, PAD)
    path = tmp_path / "model.arpa"
    sizes = ngram.write_arpa(model, path)["num_ngrams"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.arpa"]  # no temporary file left
    arpa = ngram.read_arpa(path)
    assert arpa.order == order and sizes[0] == vocab_size  # V, <s> and <unk>
    assert arpa.entries[("<unk>",)][0] == arpa.entries[("<s>",)][0] == ngram.ARPA_ZERO
    names = ngram.arpa_words(model)
    words = np.flatnonzero(model.in_vocab)
    for context in sample_contexts(rng, docs, order, 40, vocab_size):
        ours = ngram.log_probs(model, grams_for(order, context, words)) / math.log(10)
        theirs = [ngram.arpa_log10_prob(arpa, [names[t] for t in context], names[w]) for w in words]
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_kenlm_reads_our_arpa(corpus, tmp_path):
    kenlm = pytest.importorskip("kenlm")
    docs, vocab_size = corpus
    held = random_docs(np.random.default_rng(5), 10, 8, 12)  # ids 9, 10 were never seen
    tokens = stream(held)
    for order in (2, 5):  # KenLM loads bigram models and up
        model = ngram.estimate(stream(docs), order, vocab_size, BOS, EOS, PAD)
        ngram.write_arpa(model, tmp_path / "m.arpa")
        lm = kenlm.Model(str(tmp_path / "m.arpa"))
        theirs = [s[0] for d in held for s in lm.full_scores(" ".join(map(str, d)), bos=True, eos=True)]
        grams = ngram.stream_grams(
            tokens, ngram.document_index(tokens, vocab_size, BOS, EOS, PAD), order, BOS
        )
        np.testing.assert_allclose(ngram.log_probs(model, grams) / math.log(10), theirs, atol=1e-5)


@pytest.mark.parametrize("order", ["7", "0"])
def test_cli_rejects_bad_order(capsys, order):
    assert ngram_tool.main(["--config", "configs/pretrain/tiny.py", "--order", order]) == 2
    assert capsys.readouterr().err == f"error: --order={order}: expected 1..5\n"


def test_cli_report_fields(corpus):
    docs, vocab_size = corpus
    model = ngram.estimate(stream(docs), 3, vocab_size, BOS, EOS, PAD)
    report = {"order": 3, **ngram.evaluate(model, stream(docs[:3]), np.ones(vocab_size, np.int64))}
    report.update(ngram_tool.level_stats(model), seconds={"total": 1.0})
    assert report["vocabulary"] == vocab_size - 2 and report["num_ngrams"]["1"] == 7  # ids 2..8 seen
    assert set(report["discounts"]) == {"1", "2", "3"} and len(report["discounts"]["3"]) == 3
    assert f"| {report['bits_per_byte']:.4f} |" in ngram_tool.markdown(report, "toy")
