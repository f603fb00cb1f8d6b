"""Generation tests: the KV cache against full recomputation, EOS, top-k, compile counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sampling
from lm.errors import ConfigError
from lm.model import ModelConfig, Transformer, init_cache

TINY = dict(vocab_size=53, num_layers=2, num_heads=4, d_model=32, d_ff=64, max_seq_len=64)
STYLES = {
    "gpt2": ModelConfig(**TINY),
    "llama-gqa": ModelConfig(
        **TINY,
        num_kv_heads=2,
        positions="rotary",
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=False,
        use_bias=False,
    ),
}
PROMPTS = [
    [5, 9, 2],
    [7, 1, 4, 4, 8, 30, 12, 3, 9],
    [11],
    [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
]
EOS = 52


@functools.lru_cache
def params_for(config, seed=0):
    """Random parameters with large weights, so that logits are well separated (no near-ties)."""
    shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)
    draw = lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32) * (0.2 if x.ndim > 1 else 1.0))
    return jax.tree_util.tree_map(draw, nn.unbox(shapes))


@pytest.mark.parametrize("style", sorted(STYLES))
def test_cache_prefill_and_decode_match_full_forward(style):
    c = STYLES[style]
    params = params_for(c)
    apply = jax.jit(Transformer(c).apply)
    extend = jax.jit(functools.partial(Transformer(c).apply, method=Transformer.extend))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, c.vocab_size)
    full = apply(params, tokens)
    cache = init_cache(c, 2, 16)
    prefill, cache = extend(params, tokens[:, :9], cache)
    steps = [prefill]
    for t in range(9, 12):
        logits, cache = extend(params, tokens[:, t : t + 1], cache)
        steps.append(logits)
    assert int(cache["index"]) == 12
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_greedy_with_cache_equals_greedy_by_recomputation(style):
    c = STYLES[style]
    params = params_for(c)
    kw = dict(max_new_tokens=10, rng=jax.random.key(0), temperature=0.0, eos_id=-1)  # no EOS
    cached = sampling.generate(params, c, PROMPTS, **kw)
    recomputed = sampling.generate_recompute(params, c, PROMPTS, **kw)
    assert cached == recomputed
    assert [len(x) for x in cached] == [10] * 4
    assert len({tuple(x) for x in cached}) > 1  # rows are really different


def test_greedy_matches_a_python_loop_over_single_prompts():
    c = STYLES["llama-gqa"]
    params = params_for(c)
    apply = jax.jit(Transformer(c).apply)
    batch = sampling.generate(
        params, c, PROMPTS[:2], max_new_tokens=5, rng=jax.random.key(0), temperature=0.0, eos_id=EOS
    )
    for prompt, got in zip(PROMPTS[:2], batch):
        seq = list(prompt)
        for _ in range(5):  # one shape: causal, so the zeros after the sequence change nothing
            logits = apply(params, jnp.array([seq + [0] * (16 - len(seq))]))
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        assert got == seq[len(prompt) :]


def test_sampling_with_cache_equals_sampling_by_recomputation():
    c = STYLES["gpt2"]
    params = params_for(c)
    kw = dict(max_new_tokens=8, rng=jax.random.key(4), temperature=1.0, top_k=5, top_p=0.9, eos_id=EOS)
    assert sampling.generate(params, c, PROMPTS, **kw) == sampling.generate_recompute(
        params, c, PROMPTS, **kw
    )


def test_generation_stops_at_eos_and_includes_it():
    c = STYLES["gpt2"]
    params = params_for(c)
    greedy = sampling.generate(
        params, c, PROMPTS, max_new_tokens=10, rng=jax.random.key(0), temperature=0.0, eos_id=EOS
    )
    eos = greedy[0][3]  # the 4th token of row 0
    stopped = sampling.generate(
        params, c, PROMPTS, max_new_tokens=10, rng=jax.random.key(0), temperature=0.0, eos_id=eos
    )
    assert stopped[0] == greedy[0][: greedy[0].index(eos) + 1]
    for row, full in zip(stopped, greedy):
        assert row == (full[: full.index(eos) + 1] if eos in full else full)


def test_top_k_one_equals_greedy():
    c = STYLES["llama-gqa"]
    params = params_for(c)
    kw = dict(max_new_tokens=6, eos_id=EOS)
    greedy = sampling.generate(params, c, PROMPTS, rng=jax.random.key(0), temperature=0.0, **kw)
    top1 = sampling.generate(params, c, PROMPTS, rng=jax.random.key(9), temperature=1.5, top_k=1, **kw)
    assert top1 == greedy


def test_sample_tokens_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    draw = lambda **kw: np.asarray(sampling.sample_tokens(logits, jax.random.key(0), **kw))
    top2 = draw(temperature=1.0, top_k=2, top_p=1.0)
    assert set(top2) == {0, 1} and abs((top2 == 0).mean() - 0.5 / 0.8) < 0.05
    nucleus = draw(temperature=1.0, top_k=0, top_p=0.75)  # 0.5 + 0.3 reaches 0.75
    assert set(nucleus) == {0, 1}
    everything = draw(temperature=1.0, top_k=0, top_p=1.0)
    assert set(everything) == {0, 1, 2, 3}
    assert set(draw(temperature=0.0, top_k=0, top_p=1.0)) == {0}


def test_generate_compiles_once_per_shape_bucket():
    c = STYLES["gpt2"].replace(num_layers=1)
    params = params_for(c)
    before = sampling._generate_cached._cache_size()
    kw = dict(max_new_tokens=4, eos_id=EOS)
    sampling.generate(params, c, [[1, 2, 3], [4, 5]], rng=jax.random.key(0), **kw)
    sampling.generate(
        params, c, [[6, 7, 8, 9, 10], [11]], rng=jax.random.key(1), temperature=0.5, top_k=3, top_p=0.9, **kw
    )  # same bucket, other settings
    assert sampling._generate_cached._cache_size() == before + 1
    sampling.generate(params, c, [[1] * 20, [2]], rng=jax.random.key(0), **kw)  # next bucket
    assert sampling._generate_cached._cache_size() == before + 2


def test_learned_positions_must_fit():
    with pytest.raises(ConfigError, match=r"^config\.model\.max_seq_len=64 "):
        sampling.generate(
            None, STYLES["gpt2"], [[1] * 60], max_new_tokens=10, rng=jax.random.key(0), eos_id=EOS
        )


@pytest.mark.parametrize("style", sorted(STYLES))
def test_sampler_log_probs_equal_teacher_forced_log_probs(style):
    """PPO's on-policy check: the log-probs the sampler records are those a training forward
    pass gives the same tokens (float32, temperature-scaled), to 1e-4; 0 after EOS."""
    c, temperature, width = STYLES[style], 0.7, 8
    params = params_for(c)
    tokens, lengths = sampling.left_pad(PROMPTS, 0, c, width)
    settings = sampling.SamplingSettings.create(temperature, 0, 1.0, EOS, 0)
    new, logps = sampling.sample_arrays(
        params, tokens, lengths, jax.random.key(3), settings, config=c, max_new_tokens=width
    )
    full = jnp.concatenate([tokens, new], axis=1)  # [batch, prompt + width]
    positions, segments = sampling.prompt_layout(jnp.asarray(lengths), full.shape[1], tokens.shape[1])
    logits = Transformer(c).apply(params, full, positions=positions, segment_ids=segments)
    scaled = jax.nn.log_softmax(logits[:, tokens.shape[1] - 1 : -1] / temperature)
    forced = jnp.take_along_axis(scaled, new[..., None], axis=-1)[..., 0]  # [batch, width]
    before_eos = np.cumsum(np.asarray(new) == EOS, axis=1) - (np.asarray(new) == EOS) == 0
    np.testing.assert_allclose(np.where(before_eos, forced, 0.0), logps, atol=1e-4)
    assert np.all(np.asarray(logps)[~before_eos] == 0.0)
