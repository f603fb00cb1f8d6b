"""tools.eval: whole-split bits per byte equals training's, k-shot prompts hold no answer, and
multiple choice scores a memorising model 1 and a uniform one 1/len(choices)."""

import json
import os
import string

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ONE_DEVICE, run_module

from lm import saved_model, scoring
from lm.data import graded_tasks, pipeline
from lm.data import sft as sft_data
from lm.data.tokenizer import ByteTokenizer, write_hf_tokenizer
from lm.model import ModelConfig
from tools import eval as eval_tool

STDLIB = os.path.dirname(string.__file__)
FILES = (
    "string.py",
    "textwrap.py",
    "shlex.py",
    "glob.py",
    "fnmatch.py",
    "bisect.py",
    "colorsys.py",
    "keyword.py",
)


def _corpus(tmp_path) -> str:
    """A few standard-library sources and a non-ASCII file, as a text_files glob."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in FILES:
        (folder / f"{name}.txt").write_text(open(os.path.join(STDLIB, name), encoding="utf-8").read())
    (folder / "accents.txt").write_text("naïve café, Ünïcödé — ½ ∑ 東京\n" * 200)
    return str(folder / "*.txt")


def test_bpb_equals_the_training_runs_whole_split_figure(tmp_path):
    """A sentencepiece run (tokens are not bytes) with eval_batches=0; tools.eval recomputes its
    final eval_bits_per_byte from the checkpoint, and its byte count is the held-out text's."""
    files, workdir = _corpus(tmp_path), tmp_path / "run"
    result = run_module(
        "-m",
        "experiments.run",
        "--config=configs/pretrain/tiny.py:smoke",
        f"--workdir={workdir}",
        "--config.data.source=text_files",
        f"--config.data.files={files}",
        "--config.data.eval_fraction=0.3",
        "--config.tokenizer.kind=sentencepiece",
        "--config.tokenizer.vocab_size=512",
        "--config.train.eval_batches=0",
        "--config.train.num_samples=0",
        env=ONE_DEVICE,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    run_bpb = [r["eval_bits_per_byte"] for r in records if "eval_bits_per_byte" in r][-1]
    os.remove(workdir / "metrics.jsonl")
    out = tmp_path / "eval.json"
    assert (
        eval_tool.main(["--workdir", str(workdir), "--checkpoint", "latest", "--bpb", "--json", str(out)])
        == 0
    )
    figures = json.load(open(out))
    assert abs(figures["bits_per_byte"] - run_bpb) <= 1e-4 * run_bpb
    config = json.load(open(workdir / "config.json"))
    corpus = pipeline.open_corpus(config["data"], pipeline.resolve_data_dir(""))
    heldout_bytes = sum(len(t.encode("utf-8")) for t in corpus.texts("validation"))
    assert figures["bytes"] == heldout_bytes
    assert figures["targets"] < heldout_bytes  # tokens, not bytes


def test_kshot_prompts_never_hold_the_answer():
    for task in graded_tasks.TASKS:
        for k in (0, 1, 4, 8):
            pairs = scoring.kshot_examples(task, 60, k, seed=3)
            assert len(pairs) == 60
            for test, shots in pairs:
                assert len(shots) == k
                assert all(graded_tasks.split_of(s["prompt"]) == "train" for s in shots)
                assert graded_tasks.split_of(test["prompt"]) == "validation"
                before_test = sft_data.render_messages({}, scoring.kshot_messages(test, shots)[:-1])
                assert test["response"] not in before_test
                assert test["prompt"] not in before_test


def test_kshot_shots_rotate_and_the_answer_is_the_first_line():
    pairs = scoring.kshot_examples("add", 10, 2, seed=0)
    assert len({tuple(s["prompt"] for s in shots) for _, shots in pairs}) > 1
    assert scoring.first_line("1068\nUser: Add: 1 + 2") == "1068"


def _model_cfg(vocab: int = 256) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, num_layers=2, num_heads=4, d_model=64, d_ff=256, max_seq_len=128)


def _logprob_fn(cfg, params, tok):
    def logprob_fn(pairs):
        encoded = [scoring.encode_pair(tok, c, x) for c, x in pairs]
        return scoring.continuation_logprobs(cfg, params, encoded, max_len=cfg.max_seq_len, pad_id=tok.pad_id)

    return logprob_fn


def test_multiple_choice_uniform_model_scores_one_over_choices():
    items = scoring.graded_choice_items("add,reverse", 40, seed=0)
    assert len(items) == 40 and all(len(i["choices"]) == 4 for i in items)
    cfg, tok = _model_cfg(), ByteTokenizer()
    shapes = jax.eval_shape(
        lambda: scoring.build_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])  # logits 0: uniform
    result = scoring.multiple_choice(items, _logprob_fn(cfg, zeros, tok))
    assert result["acc"] == result["acc_norm"] == 0.25


def test_multiple_choice_memorising_model_scores_one():
    items = scoring.graded_choice_items("add,reverse", 8, seed=0)
    cfg, tok = _model_cfg(), ByteTokenizer()
    texts = [i["context"] + i["choices"][i["gold"]] for i in items]
    width = max(len(t) for t in texts) + 1
    tokens = np.full((len(texts), width), tok.pad_id, np.int32)
    mask = np.zeros((len(texts), width - 1), np.float32)
    for row, t in enumerate(texts):
        ids = [tok.bos_id] + tok.encode(t)
        tokens[row, : len(ids)] = ids
        mask[row, : len(ids) - 1] = 1.0
    model = scoring.build_model(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens[:, :-1]))["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logp = jax.nn.log_softmax(model.apply({"params": p}, tokens[:, :-1]))
            picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            return -jnp.sum(picked * mask) / mask.sum()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

    opt_state = tx.init(params)
    for _ in range(200):
        params, opt_state, value = step(params, opt_state)
    assert value < 0.1  # nats per token of context and answer
    result = scoring.multiple_choice(items, _logprob_fn(cfg, params, tok))
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0


def test_bad_mc_file_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "mc.jsonl"
    bad.write_text(
        '{"context": "a", "choices": ["b", "c"], "gold": 0}\n{"context": "a", "choices": ["b"], "gold": 0}\n'
    )
    assert eval_tool.main(["--workdir", str(tmp_path), "--mc", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


@pytest.mark.slow  # about 20 s: builds, saves and imports a transformers model
def test_mc_on_an_imported_model_equals_transformers(tmp_path):
    """`--workdir hf:DIR`: each choice's log-likelihood equals transformers' on the same ids, and
    the CLI's acc is the one those log-likelihoods give."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tools import import_hf

    config = transformers.LlamaConfig(
        vocab_size=272,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    hf_dir = str(tmp_path / "hf")
    model.save_pretrained(hf_dir)
    write_hf_tokenizer(ByteTokenizer(), hf_dir)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "x", "yy", "zzz"]
    items = [
        {
            "context": " ".join(rng.choice(words, 4)) + " ",
            "choices": list(rng.choice(words, 3)),
            "gold": i % 3,
        }
        for i in range(6)
    ]
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(i) + "\n" for i in items))

    import_hf.import_hf(hf_dir, str(tmp_path / "w"))
    saved = saved_model.load(str(tmp_path / "w"))
    pairs = [scoring.encode_pair(saved.tokenizer, i["context"], c) for i in items for c in i["choices"]]
    ours = scoring.continuation_logprobs(saved.model_cfg, saved.params, pairs, max_len=64, pad_id=0)
    theirs = []
    for context, continuation in pairs:
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        picked = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        theirs.append(float(picked[len(context) - 1 :].sum()))
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=1e-5)

    out = tmp_path / "e.json"
    assert eval_tool.main(["--workdir", f"hf:{hf_dir}", "--mc", str(mc), "--json", str(out)]) == 0
    by_item = np.array(theirs).reshape(len(items), 3)
    expected = np.mean([np.argmax(ll) == i["gold"] for ll, i in zip(by_item, items)])
    assert json.load(open(out))["mc"]["acc"] == pytest.approx(expected)
