"""RLHF math: the ranking and DPO losses, and PPO's pieces (GAE, whitening, clipped losses, KL)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import losses, rl

EOS = 2


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def ranking(scores, ranks, mask=None, margin=0.0):
    scores, ranks = jnp.asarray(scores, jnp.float32), jnp.asarray(ranks, jnp.int32)
    mask = jnp.ones(scores.shape, bool) if mask is None else jnp.asarray(mask, bool)
    return [float(x) for x in jax.jit(losses.ranking_loss)(scores, ranks, mask, margin)]


def test_ranking_loss_two_responses():
    loss, accuracy, weight = ranking([[1.5, 0.3], [0.2, 0.9]], [[0, 1], [0, 1]])
    assert loss == pytest.approx(-log_sigmoid(1.2) - log_sigmoid(-0.7), rel=1e-6)
    assert (accuracy, weight) == (1.0, 2.0)


def test_ranking_loss_four_responses_mean_of_six_pairs():
    scores, ranks = [0.5, -1.0, 2.0, 0.1], [1, 3, 0, 2]
    pair_losses = [
        -log_sigmoid(scores[w] - scores[loser])
        for w, loser in itertools.permutations(range(4), 2)
        if ranks[w] < ranks[loser]
    ]
    assert len(pair_losses) == 6
    loss, accuracy, weight = ranking([scores], [ranks])
    assert loss == pytest.approx(np.mean(pair_losses), rel=1e-6)
    assert (accuracy, weight) == (1.0, 1.0)
    _, accuracy, _ = ranking([[0.5, 3.0, 2.0, 0.1]], [ranks])  # the worst now scores best: 3 pairs wrong
    assert accuracy == pytest.approx(0.5)


def test_ranking_loss_invariances():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 5)).astype(np.float32)
    ranks = np.array([[0, 1, 2, 3, 4], [4, 0, 3, 1, 2], [2, 2, 0, 1, 3]])
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
    base = ranking(scores, ranks, mask)
    np.testing.assert_allclose(ranking(scores + 7.0, ranks, mask), base, rtol=1e-5)
    perm = rng.permutation(5)
    np.testing.assert_allclose(ranking(scores[:, perm], ranks[:, perm], mask[:, perm]), base, rtol=1e-6)
    changed = scores.copy()
    changed[1, 3:] = [100.0, -np.inf]
    changed[2, 4] = np.nan
    np.testing.assert_allclose(ranking(changed, ranks, mask), base, rtol=1e-6)


def test_ranking_loss_ties_dropped_and_margin():
    # Responses 1 and 2 tie: only pairs (0,1), (0,2) count.
    loss, _, weight = ranking([[1.0, 0.0, 3.0]], [[0, 1, 1]])
    assert loss == pytest.approx(-(log_sigmoid(1.0) + log_sigmoid(-2.0)) / 2, rel=1e-6)
    assert weight == 1.0
    loss, accuracy, weight = ranking([[1.0, 0.0], [0.0, 5.0]], [[0, 1], [0, 0]])  # second: a tie only
    assert (loss, accuracy, weight) == (pytest.approx(-log_sigmoid(1.0), rel=1e-6), 1.0, 1.0)
    loss, _, _ = ranking([[1.0, 0.0]], [[0, 1]], margin=0.5)
    assert loss == pytest.approx(-log_sigmoid(0.5), rel=1e-6)


def test_ranking_loss_gradient_separates_the_pair():
    grad = jax.jit(
        jax.grad(lambda s: losses.ranking_loss(s, jnp.array([[0, 1]]), jnp.ones((1, 2), bool))[0])
    )(jnp.zeros((1, 2)))
    np.testing.assert_allclose(grad, [[-0.5, 0.5]], rtol=1e-6)


def test_dpo_loss_at_init_and_gradient_sign():
    chosen, rejected = jnp.array([-12.0, -3.0]), jnp.array([-10.0, -8.0])
    dpo = jax.jit(losses.dpo_loss)
    loss, chosen_reward, rejected_reward = dpo(chosen, rejected, chosen, rejected, 0.1)
    np.testing.assert_allclose(loss, [math.log(2)] * 2, rtol=1e-6)
    np.testing.assert_allclose(chosen_reward, 0.0)
    np.testing.assert_allclose(rejected_reward, 0.0)
    loss, chosen_reward, _ = dpo(chosen + 1.0, rejected, chosen, rejected, 0.1)
    np.testing.assert_allclose(loss, -log_sigmoid(0.1), rtol=1e-6)
    np.testing.assert_allclose(chosen_reward, 0.1, rtol=1e-6)
    grad_c, grad_r = jax.jit(
        jax.grad(lambda c, r: jnp.sum(dpo(c, r, chosen, rejected, 0.1)[0]), argnums=(0, 1))
    )(chosen, rejected)
    assert np.all(grad_c < 0) and np.all(grad_r > 0)  # descent raises chosen, lowers rejected


def test_token_logprobs_entropy_and_response_mask():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.bfloat16)
    tokens = rng.integers(0, 7, size=(2, 5))
    logp = jax.jit(rl.token_logprobs)(logits, tokens)
    wide = np.asarray(logits, np.float64)
    log_softmax = wide - np.log(np.sum(np.exp(wide), -1, keepdims=True))
    assert logp.dtype == jnp.float32
    np.testing.assert_allclose(
        logp, np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0], rtol=1e-6
    )
    entropy = jax.jit(rl.entropy_from_logits)
    np.testing.assert_allclose(entropy(logits), -np.sum(np.exp(log_softmax) * log_softmax, -1), rtol=1e-5)
    np.testing.assert_allclose(entropy(jnp.zeros((1, 1, 7))), [[math.log(7)]], rtol=1e-6)
    tokens = jnp.array([[5, EOS, 6, EOS], [EOS, 3, 3, 3], [4, 4, 4, 4]])
    np.testing.assert_array_equal(
        jax.jit(rl.response_mask, static_argnums=1)(tokens, EOS), [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    )


def gae_loop(rewards, values, mask, gamma, lam):
    batch, steps = rewards.shape
    advantages, returns = np.zeros((batch, steps)), np.zeros((batch, steps))
    for b in range(batch):
        length = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t + 1 < length else 0.0
            last = rewards[b, t] + gamma * next_value - values[b, t] + gamma * lam * last
            advantages[b, t], returns[b, t] = last, last + values[b, t]
    return advantages, returns


def ragged(rng, batch=4, steps=9):
    lengths = np.array([steps, 1, 5, 0])[:batch]
    mask = (np.arange(steps)[None] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(batch, steps)).astype(np.float32)
    values = rng.normal(size=(batch, steps)).astype(np.float32)
    return rewards, values, mask


def test_gae_matches_python_loop():
    rewards, values, mask = ragged(np.random.default_rng(2))
    advantages, returns = jax.jit(rl.gae)(rewards, values, mask, 0.99, 0.95)
    expected_advantages, expected_returns = gae_loop(rewards, values, mask, 0.99, 0.95)
    np.testing.assert_allclose(advantages, expected_advantages, atol=1e-6)
    np.testing.assert_allclose(returns, expected_returns, atol=1e-6)
    assert np.all(np.asarray(advantages)[mask == 0] == 0)


def test_gae_undiscounted_returns_are_reward_to_go():
    rewards, values, mask = ragged(np.random.default_rng(3))
    advantages, _ = jax.jit(rl.gae)(rewards, values, mask, 1.0, 1.0)
    reward_to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1] * mask
    np.testing.assert_allclose((advantages + values) * mask, reward_to_go, atol=1e-5)


def test_kl_penalised_rewards():
    logp = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    ref_logp = jnp.array([[-1.5, -1.0, -0.5, -9.0], [-2.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], jnp.float32)
    rewards, kl = jax.jit(rl.kl_penalised_rewards)(jnp.array([10.0, 20.0, 30.0]), logp, ref_logp, mask, 0.1)
    np.testing.assert_allclose(
        rewards, [[-0.05, 0.1, 10.0, 0.0], [-0.1, -0.1, -0.1, 19.9], [0, 0, 0, 0]], rtol=1e-6
    )
    np.testing.assert_allclose(kl, [-0.5, 4.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(rl.sequence_kl)(logp, ref_logp, mask), kl)


def test_tokens_after_eos_change_nothing():
    rng = np.random.default_rng(4)
    tokens = np.array([[5, 6, EOS, 7, 7, 7], [5, EOS, 3, 3, 3, 3], [4, 4, 4, 4, 4, 4]])
    mask = (np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0).astype(np.float32)
    after = np.asarray(mask) == 0
    arrays = {
        k: rng.normal(size=tokens.shape).astype(np.float32)
        for k in ("logp", "old_logp", "ref_logp", "values", "old_values", "rewards", "advantages")
    }

    @jax.jit
    def outputs(a):
        rewards, kl = rl.kl_penalised_rewards(
            jnp.array([1.0, -1.0, 0.5]), a["logp"], a["ref_logp"], mask, 0.05
        )
        advantages, returns = rl.gae(a["rewards"], a["values"], mask, 0.9, 0.8)
        white = rl.whiten(a["rewards"], mask, shift_mean=False)
        policy = rl.ppo_policy_loss(a["logp"], a["old_logp"], a["advantages"], mask, 0.2)
        value = rl.value_loss(a["values"], a["old_values"], a["rewards"], mask, 0.2)
        ev = rl.explained_variance(a["values"], a["rewards"], mask)
        return jax.tree.leaves((rewards, kl, advantages, returns, white, policy, value, ev))

    base = outputs(arrays)
    perturbed = {k: np.where(after, v + rng.normal(size=v.shape) * 50, v) for k, v in arrays.items()}
    perturbed["logp"] = np.where(after, np.inf, arrays["logp"])
    perturbed["values"] = np.where(after, np.nan, arrays["values"])
    for got, want in zip(outputs(perturbed), base):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    grad = jax.jit(
        jax.grad(lambda lp: rl.ppo_policy_loss(lp, arrays["old_logp"], arrays["advantages"], mask, 0.2)[0])
    )(perturbed["logp"])
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[after] == 0)


def test_whiten_statistics():
    x = jnp.array([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -99.0, -99.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    valid = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    whiten = jax.jit(rl.whiten, static_argnames="shift_mean")
    white = np.asarray(whiten(x, mask))[np.asarray(mask) > 0]
    np.testing.assert_allclose(white, (valid - 3.0) / np.sqrt(2.0), rtol=1e-5)  # population variance 2
    kept = np.asarray(whiten(x, mask, shift_mean=False))[np.asarray(mask) > 0]
    np.testing.assert_allclose(kept, white + 3.0, rtol=1e-5)
    assert float(np.mean(kept)) == pytest.approx(3.0) and float(np.std(kept)) == pytest.approx(1.0, rel=1e-5)


def test_ppo_on_policy_and_clipping():
    rng = np.random.default_rng(5)
    logp = rng.normal(size=(3, 6)).astype(np.float32)
    advantages = rng.normal(size=(3, 6)).astype(np.float32)
    mask = (np.arange(6)[None] < np.array([[6], [2], [4]])).astype(np.float32)
    ppo = jax.jit(rl.ppo_policy_loss)
    loss, stats = ppo(logp, logp, advantages, mask, 0.2)
    assert float(loss) == pytest.approx(-advantages[mask > 0].mean(), rel=1e-6)
    assert (float(stats["clip_fraction"]), float(stats["approx_kl"]), float(stats["ratio_mean"])) == (
        0.0,
        0.0,
        1.0,
    )
    # Ratios e^0.5 with A = +1 (clipped to 1.2) and e^-0.5 with A = -1 (clipped to 0.8); e^0.1 unclipped.
    log_ratio, adv = jnp.array([[0.5, -0.5, 0.1, 0.1]]), jnp.array([[1.0, -1.0, 1.0, 1.0]])
    one = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = ppo(log_ratio, jnp.zeros((1, 4)), adv, one, 0.2)
    assert float(loss) == pytest.approx((-1.2 + 0.8 - math.exp(0.1)) / 3, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 3)
    k3 = [math.exp(r) - 1 - r for r in (0.5, -0.5, 0.1)]
    assert float(stats["approx_kl"]) == pytest.approx(np.mean(k3), rel=1e-5)


def test_value_loss_clipping_and_explained_variance():
    values, old = jnp.array([[1.0, 0.0, 0.5]]), jnp.array([[0.0, 0.0, 0.4]])
    returns, mask = jnp.array([[2.0, 1.0, 0.0]]), jnp.ones((1, 3))
    loss, stats = jax.jit(rl.value_loss)(values, old, returns, mask, 0.2)
    # Token 0: clipped to 0.2, error 1.8^2 > 1^2; token 1: 1; token 2: 0.5^2 > clipped 0.5^2 (equal).
    assert float(loss) == pytest.approx(0.5 * (1.8**2 + 1.0 + 0.25) / 3, rel=1e-6)
    assert float(stats["clip_fraction"]) == pytest.approx(1 / 3)
    returns = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    explained_variance = jax.jit(rl.explained_variance)
    assert float(explained_variance(returns, returns, jnp.ones((1, 4)))) == pytest.approx(1.0)
    assert float(explained_variance(jnp.full((1, 4), 2.5), returns, jnp.ones((1, 4)))) == pytest.approx(0.0)


def test_adaptive_kl_controller():
    assert float(rl.adaptive_kl_update(0.1, 6.6, 6.0, 10000, 512)) == pytest.approx(
        0.1 * (1 + 0.1 * 512 / 10000)
    )
    assert float(rl.adaptive_kl_update(0.1, 60.0, 6.0, 10000, 512)) == pytest.approx(
        0.1 * (1 + 0.2 * 512 / 10000)
    )
    assert float(rl.adaptive_kl_update(0.1, 0.0, 6.0, 10000, 512)) == pytest.approx(
        0.1 * (1 - 0.2 * 512 / 10000)
    )
    assert float(rl.adaptive_kl_update(0.1, 6.0, 6.0, 100, 64)) == pytest.approx(0.1)
    assert float(rl.fixed_kl_update(0.1, 60.0, 6.0, 100, 64)) == pytest.approx(0.1)


def test_gao_fit_recovers_known_parameters_and_peak():
    from tools import plot_rlhf

    d = np.linspace(0.05, 6.0, 40)
    gain = d * (0.3 - 0.12 * np.log(d)) + np.random.default_rng(0).normal(0, 1e-3, d.shape)
    fit = plot_rlhf.fit_gao_rl(np.concatenate([[0.0], d]), np.concatenate([[0.0], gain]))
    assert fit["alpha"] == pytest.approx(0.3, abs=5e-3) and fit["beta"] == pytest.approx(0.12, abs=3e-3)
    assert fit["peak_sqrt_kl"] == pytest.approx(math.exp(0.3 / 0.12 - 1), rel=0.05) and fit["rmse"] < 2e-3


def test_mean_sd_table_over_seeds():
    from tools import plot_rlhf

    reports = [
        {
            "ppo": {
                "oracle_score": x,
                "kl_to_sft": kl,
                "win_rate_ci": [0, 1],
                "oracle_score_by_task": {"add": x},
            },
            "reward": {"rm_accuracy": 0.7},
        }
        for x, kl in ((0.5, None), (0.7, 2.0))
    ]
    table = plot_rlhf.mean_sd_table(reports).splitlines()
    assert table[0] == "| stage (n = 2) | oracle_score | rm_accuracy | kl_to_sft |"  # numbers only
    assert table[2] == f"| ppo | 0.600 ± {np.std([0.5, 0.7], ddof=1):.3f} | – | 2.000 ± 0.000 |"


# ---- GRPO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("std_normalise", [True, False])
def test_group_advantages_equal_a_loop_over_groups(std_normalise):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=24).astype(np.float32)
    scores[8:12] = 0.5  # one group of equal scores
    got = np.asarray(rl.group_advantages(jnp.asarray(scores), 4, std_normalise))
    for g in range(6):
        s = scores[g * 4 : (g + 1) * 4].astype(np.float64)
        want = s - s.mean()
        if std_normalise:
            want = want / (s.std() + 1e-4)
        np.testing.assert_allclose(got[g * 4 : (g + 1) * 4], want, rtol=1e-5, atol=1e-6)
    assert np.all(got[8:12] == 0.0)
    assert float(rl.zero_variance_fraction(jnp.asarray(scores), 4)) == pytest.approx(1 / 6)


@pytest.mark.parametrize("loss_norm", ["token", "sequence"])
def test_groups_with_equal_rewards_contribute_no_policy_gradient(loss_norm):
    """Without the KL term a group whose scores are all equal has zero advantages, so its tokens'
    log-probs get exactly zero gradient; the other group's do not."""
    rng = np.random.default_rng(1)
    scores = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.2])
    advantages = rl.group_advantages(scores, 4)
    logp = jnp.asarray(rng.normal(-2.0, 0.3, (8, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((8, 5)) < 0.8)

    def loss(lp):
        return rl.grpo_policy_loss(
            lp, logp, logp, advantages, mask, clip_eps=0.2, kl_coef=0.0, loss_norm=loss_norm
        )[0]

    grads = np.asarray(jax.grad(loss)(logp))
    assert np.all(grads[:4] == 0.0)
    assert np.abs(grads[4:][np.asarray(mask[4:])]).min() > 0


def test_grpo_loss_on_policy_is_minus_the_mean_advantage_and_k3_is_zero():
    """On the first minibatch (logp == old_logp == ref_logp) the ratio is 1, nothing is clipped,
    the k3 KL is 0, and the loss is minus the advantage averaged as loss_norm says."""
    mask = jnp.asarray([[1, 1, 1, 0], [1, 0, 0, 0]], jnp.float32)
    logp = jnp.full((2, 4), -1.3)
    adv = jnp.asarray([0.5, -2.0])
    token, stats = rl.grpo_policy_loss(logp, logp, logp, adv, mask, clip_eps=0.2, kl_coef=0.1)
    assert float(token) == pytest.approx(-(3 * 0.5 - 2.0) / 4)
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_fraction"]) == 0.0
    sequence, _ = rl.grpo_policy_loss(
        logp, logp, logp, adv, mask, clip_eps=0.2, kl_coef=0.1, loss_norm="sequence"
    )
    assert float(sequence) == pytest.approx(-(0.5 - 2.0) / 2)
    assert float(rl.k3_kl(logp, logp).sum()) == 0.0
    assert float(rl.k3_kl(jnp.asarray([-1.0]), jnp.asarray([-2.0]))[0]) == pytest.approx(math.exp(-1) + 1 - 1)
