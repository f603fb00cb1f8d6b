"""Encoders: BERT's masking rule, NSP pairs, bidirectional attention, the masked-LM loss, downstream
heads and labels."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sharding
from lm.data import downstream
from lm.data import mlm as mlm_data
from lm.data.tokenizer import ByteTokenizer
from lm.heads import DownstreamModel, MaskedLM
from lm.model import ModelConfig, Transformer
from lm.tasks import finetune, mlm

CFG = ModelConfig(
    vocab_size=260, num_layers=2, num_heads=2, d_model=32, d_ff=64, max_seq_len=32, bidirectional=True
)
SPECIAL = mlm_data.special_ids(ByteTokenizer())


def test_masking_proportions_and_specials():
    """Over 1e5 tokens: 15% of the ordinary tokens picked, of those 80% [MASK], 10% random, 10% kept
    (each within 1%); [CLS], [SEP] and padding never picked nor changed."""
    rng = np.random.default_rng(0)
    picked = masked = swapped = kept = ordinary = 0
    for _ in range(1100):
        row = rng.integers(SPECIAL.first_regular, SPECIAL.mask, 128).astype(np.int32)
        row[0], row[60], row[100] = SPECIAL.cls, SPECIAL.sep, SPECIAL.sep
        row[101:] = SPECIAL.pad
        inputs, positions, targets, weights = mlm_data.mask_tokens(row, SPECIAL, rng, 20)
        real = positions[weights > 0]
        special = np.isin(row, [SPECIAL.cls, SPECIAL.sep, SPECIAL.pad])
        assert not special[real].any() and np.array_equal(inputs[special], row[special])
        assert np.array_equal(targets[weights > 0], row[real])
        changed = np.flatnonzero(inputs != row)
        assert set(changed) <= set(real)  # nothing outside the picked positions changes
        ordinary += int((~special).sum())
        picked += len(real)
        masked += int((inputs[real] == SPECIAL.mask).sum())
        kept += int((inputs[real] == row[real]).sum())
        swapped += int(((inputs[real] != row[real]) & (inputs[real] != SPECIAL.mask)).sum())
    assert ordinary >= 1e5
    assert abs(picked / ordinary - 0.15) < 0.01
    assert abs(masked / picked - 0.8) < 0.01
    assert abs(swapped / picked - 0.1) < 0.01 and abs(kept / picked - 0.1) < 0.01


def _corpus():
    """Documents of lines that name themselves ('d3 l7'), in bytes."""
    rng = np.random.default_rng(1)
    docs = ["\n".join(f"d{d} l{i}" for i in range(int(rng.integers(4, 30)))) for d in range(40)]
    return mlm_data.line_corpus(docs, ByteTokenizer()), docs


@pytest.mark.parametrize("kind", ["binary", "three_way"])
def test_nsp_labels_balanced_and_pairs_true(kind):
    corpus, docs = _corpus()
    tok = ByteTokenizer()
    rng = np.random.default_rng(2)
    classes = mlm_data.NSP_CLASSES[kind]
    labels = []
    for _ in range(6000):
        pair = mlm_data.nsp_pair(corpus, rng, kind, 60)
        labels.append(pair["label"])
        (ad, a0, a1), (bd, b0, b1) = pair["a_lines"], pair["b_lines"]
        lines = docs[ad].split("\n")
        assert tok.decode(pair["a"]) == "".join(lines[a0:a1])[: len(pair["a"])]
        assert tok.decode(pair["b"]) == "".join(docs[bd].split("\n")[b0:b1])[: len(pair["b"])]
        assert len(pair["a"]) + len(pair["b"]) <= 60
        if pair["label"] == 0:
            assert (bd, b0) == (ad, a1)
        elif pair["label"] == classes - 1:
            assert bd != ad
        else:
            assert bd == ad and not a0 <= b0 <= a1
    shares = np.bincount(labels, minlength=classes) / len(labels)
    assert np.all(np.abs(shares - 1 / classes) < 0.02), shares


def test_bidirectional_sees_later_tokens_and_keeps_segments():
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (1, 12)), jnp.int32)
    segments = jnp.asarray([[1] * 8 + [2] * 4], jnp.int32)
    later = tokens.at[0, 6].set(7)
    other_segment = tokens.at[0, 10].set(7)
    for bidirectional in (True, False):
        model = Transformer(CFG.replace(bidirectional=bidirectional))
        params = model.init(jax.random.PRNGKey(0), tokens)
        hidden = jax.jit(lambda t: model.apply(params, t, segment_ids=segments, method="hidden"))
        base = hidden(tokens)
        assert bool(jnp.any(jnp.abs(hidden(later)[0, 2] - base[0, 2]) > 1e-6)) == bidirectional
        assert float(jnp.abs(hidden(other_segment)[0, :8] - base[0, :8]).max()) == 0.0


def test_mlm_loss_counts_picked_positions_only():
    rng = np.random.default_rng(0)
    corpus, _ = _corpus()
    batch = mlm_data.mlm_batch(corpus, range(4), (0, 0, 0), "binary", 32, SPECIAL)
    model = MaskedLM(CFG, 2)
    params = sharding.unboxed(
        model.init(jax.random.PRNGKey(0), batch["inputs"], batch["mlm_positions"])["params"]
    )
    sums_fn = jax.jit(lambda b: mlm.sums(params, b, None, model=model))
    sums = sums_fn(batch)
    logits, _ = jax.jit(model.apply)(
        {"params": params}, batch["inputs"], batch["mlm_positions"], segment_ids=batch["segment_ids"]
    )
    logp = jax.nn.log_softmax(logits)
    w = batch["mlm_weights"]
    by_hand = -np.sum(np.take_along_axis(np.asarray(logp), batch["mlm_targets"][..., None], -1)[..., 0] * w)
    assert np.isclose(float(sums["mlm_loss"]), by_hand, rtol=1e-5) and float(sums["mlm_count"]) == w.sum()
    # Targets and positions past each row's picks change nothing.
    moved = {**batch, "mlm_targets": np.where(w > 0, batch["mlm_targets"], rng.integers(3, 259, w.shape))}
    assert float(sums_fn(moved)["mlm_loss"]) == float(sums["mlm_loss"])


def test_span_loss_is_the_hand_computed_cross_entropy():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 2)), jnp.float32)
    segments = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)
    batch = {"labels": jnp.asarray([[1, 3], [2, 2]]), "weights": jnp.ones((2, 1)), "segment_ids": segments}
    loss, _, weight = finetune.head_loss(logits, batch, "span")
    by_hand = 0.0
    for row, (start, end) in enumerate([(1, 3), (2, 2)]):
        n = int(segments[row].sum())
        for k, target in ((0, start), (1, end)):
            by_hand += -float(jax.nn.log_softmax(logits[row, :n, k])[target]) / 2
    assert np.isclose(float(loss), by_hand, rtol=1e-6) and float(weight) == 2.0


@pytest.mark.parametrize("head", ["classify", "tag", "span"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_changes_no_logits(head, bidirectional):
    cfg = CFG.replace(bidirectional=bidirectional)
    model = DownstreamModel(cfg, head, 3)
    tokens = np.random.default_rng(0).integers(3, 259, (1, 10)).astype(np.int32)
    padded = np.concatenate([tokens, np.full((1, 6), 9, np.int32)], axis=1)
    segments = (np.arange(16) < 10).astype(np.int32)[None]
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))
    apply = jax.jit(lambda t, s: model.apply(params, t, segment_ids=s))
    short = apply(tokens, np.ones_like(tokens))
    long = apply(padded, segments)
    if head != "classify":
        long = long[:, :10]
    np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=1e-5)


def test_tagging_labels_every_piece_by_its_first_character():
    """Byte pieces of `if x: return 'a b'  # c`: each takes its character's tokenize category;
    whitespace alone is not scored (also inside the string)."""
    source = "if x:\n    return 'a b'  # c\n"
    tags = downstream.char_tags(source)
    tok = ByteTokenizer()
    ids = tok.encode(source)
    labels = downstream.piece_tags(source, downstream.piece_spans(source, ids, tok.token_bytes()), tags)
    names = [None if t == downstream.IGNORE else downstream.TAGS[t] for t in labels]
    expect = {0: "keyword", 3: "name", 4: "operator", 10: "keyword", 17: "string", 19: None, 20: "string"}
    assert all(names[i] == want for i, want in expect.items()), names
    assert names[source.index("#")] == "comment" and names[source.index("c\n")] == "comment"
    assert names[2] is None and names[5] is None  # a space and a newline


def test_span_examples_point_at_the_last_return_value():
    source = "def f(a):\n    if a:\n        return a + 1\n    return g(a)\n"
    tok = ByteTokenizer()
    (example,) = downstream.build_examples("span", [("m.py", source)], tok, 64)
    start, end = example["label"]
    assert tok.decode(example["tokens"][start : end + 1]) == "g(a)"
    b0, b1 = example["baseline"]
    assert tok.decode(example["tokens"][b0 : b1 + 1]) == "a + 1"


@pytest.mark.slow
def test_mlm_then_finetune_runs(tmp_path):
    """The smoke chain: an encoder with NSP, then each downstream head from it."""
    from conftest import ONE_DEVICE, run_module

    mlm_dir = tmp_path / "mlm"
    result = run_module(
        "-m", "experiments.run", "--config=configs/mlm/tiny.py:smoke", f"--workdir={mlm_dir}", env=ONE_DEVICE
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in open(mlm_dir / "metrics.jsonl")]
    assert {"eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"} <= set(records[-1])
    run = json.load(open(mlm_dir / "config.json"))["run"]
    assert run["trainable_params"] == run["params"] > 0
    for task in ("tagging", "span"):
        workdir = tmp_path / task
        result = run_module(
            "-m",
            "experiments.run",
            f"--config=configs/finetune/{task}.py:smoke",
            f"--config.init_from={mlm_dir}",
            f"--workdir={workdir}",
            env=ONE_DEVICE,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        last = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
        baseline = "eval_copy_first_span_accuracy" if task == "span" else "eval_majority_accuracy"
        assert {"eval_loss", "eval_accuracy", baseline} <= set(last)
        assert (workdir / "best").is_dir()


def test_token_types_switch_after_the_first_sep():
    from lm.heads import token_types

    tokens = jnp.asarray([[1, 5, 2, 6, 7, 2, 0], [1, 5, 6, 2, 0, 0, 0]])
    np.testing.assert_array_equal(token_types(tokens, 2), [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
