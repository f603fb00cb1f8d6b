"""`tools.export --hf OUT --peft`: a LoRA run as OUT/base (Hugging Face) and OUT/adapter (PEFT), which
peft loads onto the base to the logits of our merged model; the merged export gives the same."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import ONE_DEVICE, run_module

from lm import lora, saved_model
from lm.data.tokenizer import ByteTokenizer
from lm.model import ModelConfig, Transformer
from tools import export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = [
    "--config.model.positions=rotary",
    "--config.model.norm=rmsnorm",
    "--config.model.mlp=swiglu",
    "--config.model.use_bias=False",
    "--config.model.num_kv_heads=2",
]
TOKENS = np.random.RandomState(0).randint(3, 200, (2, 16))


def hf_logits(path: str, adapter: str | None = None) -> np.ndarray:
    """Logits [batch, seq, vocab] of TOKENS from the HF model at `path`, with the PEFT `adapter`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    if adapter:
        model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits.numpy()


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Workdirs of a llama-style smoke pretrain and a LoRA (rank 4) SFT from it: {'pretrain', 'sft'}."""
    dirs = {stage: tmp_path_factory.mktemp(stage) for stage in ("pretrain", "sft")}
    commands = {
        "pretrain": ["--config=configs/pretrain/tiny.py:smoke", *LLAMA],
        "sft": [
            "--config=configs/sft/tasks_tiny.py:smoke",
            f"--config.init_from={dirs['pretrain']}",
            "--config.lora.rank=4",
            "--config.lora.modules_to_save=()",
            "--config.lora.targets=('query','value','out','wi_up','wo')",
            "--config.train.steps=4",
            "--config.train.eval_every=4",
            "--config.train.checkpoint_every=4",
        ],
    }
    for stage, args in commands.items():
        result = run_module("-m", "experiments.run", *args, f"--workdir={dirs[stage]}", env=ONE_DEVICE)
        assert result.returncode == 0, (stage, result.stderr[-2000:])
    return {stage: str(path) for stage, path in dirs.items()}


def test_peft_adapter_on_exported_base_equals_our_merged_model(lora_run, tmp_path):
    peft_dir, merged_dir = tmp_path / "peft", tmp_path / "merged"
    result = run_module("-m", "tools.export", "--workdir", lora_run["sft"], "--hf", str(peft_dir), "--peft")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_module(
        "-m", "tools.export", "--workdir", lora_run["sft"], "--hf", str(merged_dir), "--checkpoint", "latest"
    )
    assert result.returncode == 0, result.stderr[-2000:]

    config = json.loads((peft_dir / "adapter" / export.PEFT_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and (config["r"], config["lora_alpha"]) == (4, 16.0)
    assert sorted(config["target_modules"]) == sorted(
        ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    )
    model = saved_model.load(lora_run["sft"], "latest")
    ours = np.asarray(Transformer(model.model_cfg).apply({"params": model.params}, jnp.asarray(TOKENS)))
    adapted = hf_logits(str(peft_dir / "base"), str(peft_dir / "adapter"))
    np.testing.assert_allclose(adapted, ours, atol=1e-4)
    np.testing.assert_allclose(hf_logits(str(merged_dir)), ours, atol=1e-4)
    assert np.abs(hf_logits(str(peft_dir / "base")) - ours).max() > 1e-2  # the adapter matters


def test_peft_export_of_a_run_without_lora_is_one_line(lora_run, tmp_path):
    result = run_module(
        "-m", "tools.export", "--workdir", lora_run["pretrain"], "--hf", str(tmp_path / "x"), "--peft"
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not a LoRA run" in result.stderr


def test_gpt2_q_and_v_adapters_share_the_fused_c_attn(tmp_path):
    """GPT-2: q and v adapters become one rank-2r LoRA on c_attn (k's columns untouched); attention
    and MLP c_proj are told apart."""
    cfg = ModelConfig(vocab_size=64, num_layers=2, num_heads=4, d_model=64, d_ff=128, max_seq_len=32)
    lora_cfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "out", "wo"))
    model = Transformer(cfg)
    params = jax.tree.map(
        jnp.asarray, model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    adapters = lora.init_adapters(jax.random.PRNGKey(1), params, lora_cfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(2), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape) if path[-1].key == "b" else x, adapters
    )
    section = ml_collections.ConfigDict({"rank": 4, "alpha": 8.0, "dropout": 0.0, "modules_to_save": ()})
    saved = saved_model.SavedModel(params, cfg, ByteTokenizer(), ml_collections.ConfigDict(), "")
    assert export.write_peft(saved, adapters, section, str(tmp_path)) == "gpt2"

    config = json.loads((tmp_path / "adapter" / export.PEFT_CONFIG_FILE).read_text())
    assert config["rank_pattern"] == {"attn.c_attn": 8} and config["alpha_pattern"] == {"attn.c_attn": 16.0}
    tokens = jnp.asarray(TOKENS % cfg.vocab_size)
    ours = np.asarray(model.apply({"params": lora.merge(params, adapters, lora_cfg)}, tokens))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = adapted(torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
