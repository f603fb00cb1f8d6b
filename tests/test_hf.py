"""Hugging Face import and export (lm.hf, tools.import_hf, tools.export --hf) against transformers.

Small random models of every family are built with transformers and saved locally (nothing is
downloaded); our logits must equal transformers' within 1e-4 in float32.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm import hf, saved_model  # noqa: E402
from lm.data import tokenizer as tokenizer_lib  # noqa: E402
from lm.errors import ConfigError, DataError  # noqa: E402
from lm.model import ModelConfig, Transformer  # noqa: E402
from tools import export as export_tool  # noqa: E402
from tools import import_hf  # noqa: E402

VOCAB = 272  # at least the byte tokenizer's 259, which the workdir tests use
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24)).astype(np.int32)
LLAMA_SIZE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_model(family: str):
    """A small random transformers model of `family`, every parameter perturbed (biases nonzero)."""
    T = transformers
    if family == "gpt2":
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96)
        model = T.GPT2LMHeadModel(config)
    elif family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**LLAMA_SIZE, rms_norm_eps=1e-5))
    elif family == "llama3":
        model = T.LlamaForCausalLM(
            T.LlamaConfig(**LLAMA_SIZE, rope_scaling=dict(LLAMA3_ROPE, rope_theta=500000.0))
        )
    elif family == "mistral":
        model = T.MistralForCausalLM(T.MistralConfig(**LLAMA_SIZE, head_dim=32, sliding_window=None))
    elif family in ("qwen2_tied", "qwen2_untied"):
        config = T.Qwen2Config(
            **LLAMA_SIZE, rope_theta=1_000_000.0, tie_word_embeddings=family == "qwen2_tied"
        )
        model = T.Qwen2ForCausalLM(config)
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()


def _our_logits(cfg: ModelConfig, params) -> np.ndarray:
    return np.asarray(Transformer(cfg).apply({"params": params}, TOKENS))


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3", "mistral", "qwen2_tied", "qwen2_untied"])
def test_import_matches_transformers(tmp_path, family):
    model = _hf_model(family)
    model.save_pretrained(tmp_path)
    cfg, params, _ = hf.load(str(tmp_path))
    want = _hf_logits(model)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(_our_logits(cfg, params), want, atol=1e-4, rtol=0)
    if family == "llama3":
        assert cfg.rope_scaling == "llama3" and cfg.rope_original_max_len == 16 and cfg.rope_theta == 500000.0
        unscaled = _our_logits(cfg.replace(rope_scaling="none"), params)
        assert np.abs(unscaled - want).max() > 1e-3  # the scaling is what makes them match
    if family == "mistral":
        assert cfg.head_size == 32 and cfg.num_heads * cfg.head_size != cfg.d_model
    if family.startswith("qwen2"):
        assert cfg.qkv_bias and not cfg.use_bias and cfg.tie_embeddings == (family == "qwen2_tied")


def test_bfloat16_weights(tmp_path):
    model = _hf_model("qwen2_untied").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    state = hf.read_state_dict(str(tmp_path))
    for name, want in model.state_dict().items():
        np.testing.assert_array_equal(state[name], want.float().numpy())
        assert state[name].dtype == np.float32


def test_sharded_safetensors(tmp_path):
    model = _hf_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / hf.INDEX_FILE) and not os.path.exists(tmp_path / hf.WEIGHTS_FILE)
    cfg, params, _ = hf.load(str(tmp_path))
    np.testing.assert_allclose(_our_logits(cfg, params), _hf_logits(model), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2_tied"])
def test_import_workdir_export_round_trip(tmp_path, monkeypatch, family):
    model = _hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    workdir = str(tmp_path / "workdir")
    import_hf.write_workdir(str(tmp_path / "hf"), workdir, tokenizer_lib.ByteTokenizer())
    loaded = saved_model.load(workdir)
    assert loaded.model_cfg.vocab_size == VOCAB
    want = _hf_logits(model)
    np.testing.assert_allclose(_our_logits(loaded.model_cfg, loaded.params), want, atol=1e-4, rtol=0)

    out = str(tmp_path / "exported")
    written = []
    monkeypatch.setattr(tokenizer_lib, "write_hf_tokenizer", lambda tok, d: written.append(d), raising=False)
    assert export_tool.main(["--workdir", workdir, "--hf", out]) == 0
    assert written == [out]
    with open(os.path.join(out, hf.CONFIG_FILE)) as f:
        assert (
            json.load(f)["model_type"] == {"gpt2": "gpt2", "llama3": "llama", "qwen2_tied": "qwen2"}[family]
        )
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(model)
    np.testing.assert_allclose(_hf_logits(again), want, atol=1e-4, rtol=0)
    with open(os.path.join(out, hf.CONFIG_FILE)) as f:
        assert json.load(f)["eos_token_id"] == tokenizer_lib.EOS_ID


def test_init_from_hf_imports_once(tmp_path, monkeypatch):
    from lm import checkpoint

    monkeypatch.setattr(
        tokenizer_lib, "hf_tokenizer_from_dir", lambda d: tokenizer_lib.ByteTokenizer(), raising=False
    )
    _hf_model("qwen2_untied").save_pretrained(tmp_path / "hf")
    run_dir = str(tmp_path / "run")
    target = import_hf.resolve_init_from(f"hf:{tmp_path / 'hf'}", run_dir)
    assert target == os.path.join(run_dir, "hf_import")
    found, saved = checkpoint.pretrained_run(target)
    assert found == os.path.abspath(target) and saved["model"]["qkv_bias"] is True
    assert saved["run"]["imported_from"] == str(tmp_path / "hf")
    stamp = os.path.getmtime(os.path.join(target, "config.json"))
    assert import_hf.resolve_init_from(f"hf:{tmp_path / 'hf'}", run_dir) == target
    assert os.path.getmtime(os.path.join(target, "config.json")) == stamp
    assert import_hf.resolve_init_from("runs/x", run_dir) == "runs/x"


BASE = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
}


def test_rope_keys_of_transformers_4_and_5():
    v4 = hf.model_fields(
        {**BASE, "rope_theta": 5e5, "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}}
    )
    v5 = hf.model_fields({**BASE, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}})
    assert v4 == v5
    assert v5["rope_theta"] == 5e5 and v5["rope_scaling"] == "llama3" and v5["rope_original_max_len"] == 16
    plain = hf.model_fields(BASE)
    assert "rope_scaling" not in plain and ModelConfig(**plain).rope_scaling == "none"
    assert plain["rope_theta"] == 10000.0 and plain["norm_eps"] == 1e-6 and plain["num_kv_heads"] == 2
    assert hf.generation_ids({**BASE, "bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": None}) == {
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
    }


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"model_type": "falcon"}, "model_type"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding_window"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
        ({"attention_bias": True}, "attention_bias"),
        ({"intermediate_size": None}, "intermediate_size"),
        (
            {
                "model_type": "gpt2",
                "n_embd": 16,
                "n_layer": 1,
                "n_head": 2,
                "n_positions": 8,
                "activation_function": "relu",
            },
            "activation_function",
        ),
        ({"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2}, "n_positions"),
    ],
)
def test_unsupported_config_names_the_field(changes, field):
    hf_config = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**hf.model_fields(hf_config))


def test_missing_tensor_and_cli_error_are_one_line(tmp_path, capsys):
    cfg = ModelConfig(**hf.model_fields(BASE))
    state = hf.state_dict_from_params(_random_params(cfg), cfg, "llama")
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(DataError, match="model.layers.0.mlp.up_proj.weight"):
        hf.params_from_state_dict(state, cfg, "llama")
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "bert"}))
    assert import_hf.main([str(tmp_path), "--workdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model_type" in err and "bert" in err


def _random_params(cfg: ModelConfig):
    """Random numpy params of `cfg`'s shapes."""
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(jax.random.PRNGKey(0), TOKENS[:, :8] % cfg.vocab_size)
    )
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda x: rng.normal(size=x.shape).astype(np.float32), nn.meta.unbox(shapes["params"])
    )


def test_state_dict_round_trip_and_unexportable_model():
    cfg = ModelConfig(**hf.model_fields({**BASE, "model_type": "qwen2", "num_key_value_heads": 1}))
    params = _random_params(cfg)
    back = hf.params_from_state_dict(hf.state_dict_from_params(params, cfg, "qwen2"), cfg, "qwen2")
    jax.tree.map(np.testing.assert_array_equal, back, params)
    gpt_rms = ModelConfig(
        vocab_size=32, num_layers=1, num_heads=2, d_model=16, d_ff=32, max_seq_len=8, norm="rmsnorm"
    )
    with pytest.raises(ConfigError, match="config.model.norm"):
        hf.hf_config(gpt_rms)
    with pytest.raises(ConfigError, match="config.model.norm"):
        hf.save("/nonexistent/never-written", {}, gpt_rms)


@pytest.mark.skipif(
    not hasattr(tokenizer_lib, "write_hf_tokenizer") or not hasattr(tokenizer_lib, "hf_tokenizer_from_dir"),
    reason="the Hugging Face tokenizer kind is not in lm.data.tokenizer",
)
def test_cli_import_and_export_with_tokenizer(tmp_path):
    model = _hf_model("llama3")
    hf_dir, workdir, out = str(tmp_path / "hf"), str(tmp_path / "workdir"), str(tmp_path / "out")
    model.save_pretrained(hf_dir)
    tokenizer_lib.write_hf_tokenizer(tokenizer_lib.ByteTokenizer(), hf_dir)
    assert import_hf.main([hf_dir, "--workdir", workdir]) == 0
    assert export_tool.main(["--workdir", workdir, "--hf", out]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(again), _hf_logits(model), atol=1e-4, rtol=0)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs("hi").input_ids[-2:] == tokenizer_lib.ByteTokenizer().encode("hi")


GREEDY_VOCAB = 259  # odd: the byte tokenizer's, so every id decodes
GREEDY_STEPS = 32
GREEDY_TEXTS = ["To be, or not", "KING RICHARD: What say you, my lord of York?", "O"]  # 3 prompt lengths
NEAR_TIE = (
    1e-4  # a step whose top-2 logits are closer (relative) is where comparison stops, as the check does
)


def _greedy_hf_model(family: str):
    """A random transformers model with weights large enough that greedy steps are rarely near-ties:
    GPT-2, Llama with GQA and Llama 3 rope scaling (positions past 16 are scaled), Mistral or Qwen2
    (GQA, q/k/v biases)."""
    T = transformers
    common = dict(
        vocab_size=GREEDY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2
    )
    gqa = dict(
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=False
    )
    if family == "gpt2":
        config = T.GPT2Config(n_embd=48, n_layer=2, n_head=3, n_positions=96, **common)
    elif family == "mistral":
        config = T.MistralConfig(
            hidden_size=48, intermediate_size=112, num_hidden_layers=2, sliding_window=None, **gqa, **common
        )
    elif family == "qwen2":
        config = T.Qwen2Config(
            hidden_size=48, intermediate_size=100, num_hidden_layers=2, rope_theta=1e6, **gqa, **common
        )
    else:
        rope = dict(LLAMA3_ROPE, rope_theta=500000.0)
        config = T.LlamaConfig(
            hidden_size=64,
            intermediate_size=136,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=96,
            tie_word_embeddings=False,
            rope_scaling=rope,
            **common,
        )
    torch.manual_seed({"gpt2": 1, "llama": 2, "mistral": 3, "qwen2": 4}[family])
    model = T.AutoModelForCausalLM.from_config(config).float().eval()
    if family == "qwen2":  # nonzero q/k/v biases, so that importing them matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("proj.bias"):
                    p.add_(0.5 * torch.randn_like(p))
    return model


def _hf_greedy(model, prompt: list[int], steps: int, eos_id: int) -> tuple[list[int], list[float]]:
    """transformers' `generate(do_sample=False)` ids after `prompt` (up to its EOS), and each step's
    top-2 logit gap relative to max(1, max |logit|)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=eos_id,
            pad_token_id=0,
        )
    ids = out.sequences[0, len(prompt) :].tolist()
    gaps = []
    for logits in out.logits:
        top = torch.topk(logits[0].float(), 2).values
        gaps.append(float(top[0] - top[1]) / max(1.0, float(logits[0].abs().max())))
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    return ids, gaps[: len(ids)]


def _assert_same_greedy(ours: list[int], theirs: list[int], gaps: list[float], at_least: int) -> None:
    """ours == theirs up to the first near-tie step (and at least `at_least` steps compared)."""
    k = next((j for j, g in enumerate(gaps) if g < NEAR_TIE), len(theirs))
    assert k >= at_least, f"near-tie at step {k}"
    assert ours[:k] == theirs[:k]


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_greedy_tokens_equal_transformers_generate(tmp_path, capsys, family):
    """tools.sample --json --temperature 0 (prompts of 3 lengths in one left-padded batch, KV cache)
    gives transformers' greedy tokens."""
    from tools import sample as sample_tool

    model = _greedy_hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    workdir = str(tmp_path / "workdir")
    tok = tokenizer_lib.ByteTokenizer()
    import_hf.write_workdir(str(tmp_path / "hf"), workdir, tok)
    args = ["--workdir", workdir, "--temperature", "0", "--max_new_tokens", str(GREEDY_STEPS), "--json"]
    assert sample_tool.main(args + [a for t in GREEDY_TEXTS for a in ("--prompt", t)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in records] == GREEDY_TEXTS
    for text, record in zip(GREEDY_TEXTS, records):
        theirs, gaps = _hf_greedy(model, [tok.bos_id, *tok.encode(text)], GREEDY_STEPS, tok.eos_id)
        _assert_same_greedy(record["tokens"], theirs, gaps, at_least=16)
        assert record["completion"] == tok.decode(t for t in record["tokens"] if t != tok.eos_id)


def _trained_style_workdir(tmp_path):
    """A workdir as `configs/pretrain/llama.py:smoke` trains it, cheaply: its model with perturbed
    initial parameters and a sentencepiece tokenizer trained on this repository's code."""
    from configs.pretrain import llama as llama_config
    from lm import trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    texts = [open(os.path.join(root, "lm", name)).read() for name in ("model.py", "sampling.py", "hf.py")]
    tok = tokenizer_lib.train_sentencepiece(texts, tmp_path / "spm.model", vocab_size=600)
    config = llama_config.get_config("smoke")
    cfg = trainer.model_config(config, tok.vocab_size)
    shapes = Transformer(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda x: np.asarray(x, np.float32) + 0.05 * rng.normal(size=x.shape).astype(np.float32),
        nn.meta.unbox(shapes),
    )
    workdir = str(tmp_path / "workdir")
    import_hf.save_workdir(workdir, config, params, tok, {})
    return workdir, cfg, params, tok


def test_exported_trained_llama_loads_in_transformers(tmp_path):
    """A llama smoke workdir exported with tools.export --hf: transformers' logits equal ours (1e-4
    relative), and its AutoTokenizer encodes held-out text to our ids, BOS first with special tokens."""
    workdir, cfg, params, tok = _trained_style_workdir(tmp_path)
    out = str(tmp_path / "hf")
    assert export_tool.main(["--workdir", workdir, "--hf", out]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    held_out = [
        "def main(argv=None) -> int:\n    return 0\n",
        "import os\nclass Parser:\n\tx = 'naïve ↵ ▁'  # 日本\n",
        "",
    ]
    for text in held_out:
        ids = tok.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids
        assert theirs(text)["input_ids"] == [tok.bos_id, *ids]
    tokens = np.array([[tok.bos_id, *tok.encode(held_out[0] + held_out[1])][: cfg.max_seq_len]], np.int32)
    ours = np.asarray(Transformer(cfg).apply({"params": params}, tokens))
    with torch.no_grad():
        want = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()
    prompt = theirs("def main(")["input_ids"]
    greedy, gaps = _hf_greedy(model, prompt, 16, tok.eos_id)
    from lm import sampling

    (mine,) = sampling.generate(
        {"params": params},
        cfg,
        [prompt],
        max_new_tokens=16,
        rng=jax.random.PRNGKey(0),
        temperature=0.0,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    _assert_same_greedy(list(mine), greedy, gaps, at_least=8)
