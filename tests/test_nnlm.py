"""Bengio et al. 2003's neural probabilistic language model as a model kind: its context window
within a segment, its cache and samplers, its parameter counts and FLOPs, the ConfigErrors where it
cannot go, and a short run (sharded over data, fsdp and tensor) that beats the unigram."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.pretrain import nnlm as nnlm_config
from experiments import run as runner
from lm import flops, hf, sampling, trainer
from lm.data import pipeline
from lm.errors import ConfigError
from lm.model import ModelConfig, build_model, init_cache

CONTEXT = 3


def small(**changes) -> ModelConfig:
    fields = dict(vocab_size=61, num_layers=2, num_heads=4, d_model=8, d_ff=16, max_seq_len=32)
    fields.update(kind="nnlm", nnlm_context=CONTEXT, nnlm_hidden=12)
    return ModelConfig(**{**fields, **changes})


def shapes(cfg: ModelConfig):
    return jax.eval_shape(build_model(cfg).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Variables with values of about 0.5, so every weight shows in the logits."""
    rng = np.random.default_rng(seed)
    draw = lambda leaf: jnp.asarray(0.5 * rng.standard_normal(leaf.shape, np.float32))
    return jax.tree.map(draw, nn.unbox(shapes(cfg)))


@pytest.mark.parametrize("direct", [False, True])
def test_logits_see_only_the_context_window_of_their_own_segment(direct):
    """Changing input column j changes the logits at t exactly when t - CONTEXT < j <= t and j is
    in t's segment: not a token CONTEXT back, not one of the previous document."""
    cfg = small(nnlm_direct=direct)
    model, params = build_model(cfg), random_params(cfg)
    n, start = 12, 5  # the second document starts at column 5
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, n)).astype(np.int32)
    segments = np.where(np.arange(n) < start, 1, 2)[None].astype(np.int32)
    positions = np.where(np.arange(n) < start, np.arange(n), np.arange(n) - start)[None].astype(np.int32)
    logits = jax.jit(lambda t: model.apply(params, t, positions=positions, segment_ids=segments))
    base = np.asarray(logits(tokens))  # [1, n, vocab]
    t = np.arange(n)
    for j in range(n):
        changed = tokens.copy()
        changed[0, j] = (tokens[0, j] + 1) % cfg.vocab_size
        moved = np.abs(np.asarray(logits(changed)) - base).max(axis=-1)[0] > 1e-5  # [n]
        expected = (t - CONTEXT < j) & (j <= t) & (segments[0] == segments[0, j])
        np.testing.assert_array_equal(moved, expected, err_msg=f"changed column {j}")


def test_last_logits_and_the_cache_equal_the_full_pass():
    cfg = small(nnlm_direct=True)
    model, params = build_model(cfg), random_params(cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    full = model.apply(params, tokens)  # [2, 9, vocab]
    np.testing.assert_allclose(model.apply(params, tokens, method="last_logits"), full[:, -1], atol=1e-5)
    last, cache = model.apply(params, tokens[:, :4], init_cache(cfg, 2, 9), method="prefill")
    np.testing.assert_allclose(last, full[:, 3], atol=1e-5)
    assert cache["tokens"].shape == (2, CONTEXT - 1) and int(cache["index"]) == 4
    for column in range(4, 9):  # one token at a time, as the sampler decodes
        step, cache = model.apply(params, tokens[:, column : column + 1], cache, method="extend")
        np.testing.assert_allclose(step[:, 0], full[:, column], atol=1e-5)


def test_cached_sampling_equals_recomputation_for_left_padded_prompts():
    cfg = small()
    params = random_params(cfg)
    prompts = [[1, 5, 9, 11, 3, 7], [1, 4], [1]]  # padded to one bucket: short rows see no padding
    kw = dict(max_new_tokens=6, rng=jax.random.PRNGKey(0), temperature=0.0, eos_id=2, pad_id=0)
    cached = sampling.generate(params, cfg, prompts, **kw)
    assert cached == sampling.generate_recompute(params, cfg, prompts, **kw)


@pytest.mark.parametrize("direct", [False, True])
def test_param_counts_equal_the_parameters_init_creates(direct):
    for cfg in (small(nnlm_direct=direct), trainer.model_config(nnlm_config.get_config(), 4096)):
        cfg = cfg.replace(nnlm_direct=direct)
        real = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes(cfg))))
        counts = flops.param_counts(cfg)
        assert counts["total"] == real
        assert counts["embedding"] == (cfg.vocab_size + 1) * cfg.d_model  # the table and "no token"
        assert counts["position_embedding"] == 0
    extra = flops.param_counts(small(nnlm_direct=True))["total"] - flops.param_counts(small())["total"]
    assert extra == CONTEXT * 8 * 61  # W: [context * d_model, vocab]


def test_flops_per_token_count_the_multiplied_weights():
    cfg = small(nnlm_direct=True)
    non_embedding = (CONTEXT * 8 + 1) * 12 + (12 + 1) * 61 + CONTEXT * 8 * 61
    assert flops.param_counts(cfg)["non_embedding"] == non_embedding
    assert flops.flops_per_token(cfg, 32) == flops.flops_per_token(cfg, 1024) == 6 * non_embedding
    forward = 2 * 61 * 8 + 2 * CONTEXT * 8 * 12 + 2 * 12 * 61 + 2 * CONTEXT * 8 * 61
    assert flops.flops_per_token(cfg, 32, "chinchilla") == 3 * forward


def test_a_bad_kind_or_an_nnlm_where_it_cannot_go_is_one_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^config\.model\.kind='rnn' must be one of transformer, nnlm$"):
        small(kind="rnn")
    with pytest.raises(ConfigError, match=r"^config\.model\.nnlm_context=0 must be positive$"):
        small(nnlm_context=0)
    with pytest.raises(ConfigError, match=r"^config\.model\.kind='nnlm': no Hugging Face family"):
        hf.family_of(small())
    sft = nnlm_config.get_config()
    with sft.unlocked():
        sft.task, sft.init_from = "sft", "runs/nnlm"
    with pytest.raises(ConfigError, match=r"^config\.model\.kind='nnlm': a sft run needs a transformer"):
        trainer.validate(sft)
    with pytest.raises(
        ConfigError, match=r"^config\.init_from='runs/nnlm' is a run of config\.model\.kind='nnlm'"
    ):
        trainer.adopted(nnlm_config.get_config().to_dict(), sft)
    for args in (
        ["--config=configs/pretrain/nnlm.py", "--config.model.kind=rnn"],
        ["--config=configs/sft/tasks_tiny.py", "--config.init_from=x", "--config.model.kind=nnlm"],
    ):
        assert runner.main(["run", *args, f"--workdir={tmp_path / 'w'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: config.model.kind="), err
    assert not (tmp_path / "w").exists()


def test_a_short_run_beats_the_unigram_on_the_whole_heldout_split(tmp_path, capsys):
    """40 smoke-sized steps on a data x fsdp x tensor mesh of the 8 simulated devices, evaluated on
    every held-out row; then tools.sample reads the workdir back."""
    import pydoc_data.topics

    text = tmp_path / "topics.txt"
    text.write_text("\n\n".join(pydoc_data.topics.topics.values())[:120_000])
    workdir = tmp_path / "w"
    data_args = [
        "--config.data.source=text_files",
        f"--config.data.files={text}",
        "--config.data.eval_fraction=0.1",
    ]
    argv = [
        "run",
        "--config=configs/pretrain/nnlm.py:smoke",
        f"--workdir={workdir}",
        *data_args,
        "--config.model.vocab_size=260",  # the byte tokenizer's 259, padded to split over tensor=2
        "--config.mesh.data=2",
        "--config.mesh.fsdp=2",
        "--config.mesh.tensor=2",
        "--config.train.steps=60",
        "--config.train.global_batch_size=32",
        "--config.train.log_every=10",
        "--config.train.checkpoint_every=60",
        "--config.train.eval_batches=0",
    ]
    assert runner.main(argv) == 0, capsys.readouterr().err[-2000:]
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"next: python -m tools.sample --workdir {workdir} --prompt 'def '")
    )
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    config = nnlm_config.get_config("smoke")
    config.data.update(source="text_files", files=str(text), eval_fraction=0.1)
    data = pipeline.prepare_data(config.data, config.tokenizer, config.train.seq_len)
    unigram = pipeline.unigram_entropy(data.eval, data.tokenizer.vocab_size)
    unigram_bits_per_byte = unigram / math.log(2) / data.info["bytes_per_token"]
    assert records[-1]["eval_bits_per_byte"] < unigram_bits_per_byte - 0.5, (
        records[-1],
        unigram_bits_per_byte,
    )
    run = json.load(open(workdir / "config.json"))["run"]
    assert run["params"] == flops.param_counts(trainer.model_config(config, 260))["total"]
    assert (workdir / "samples.txt").read_text().count("--- sample") == 1

    from tools import sample

    capsys.readouterr()
    assert (
        sample.main(["--workdir", str(workdir), "--prompt", "The ", "--max_new_tokens", "8", "--json"]) == 0
    )
    assert len(json.loads(capsys.readouterr().out)["tokens"]) <= 8
