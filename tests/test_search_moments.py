"""The Modelverse scores, pinned against direct computations that only the correct math matches."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.stats import multivariate_normal

from modelzoo.search.moments import (
    Mixture,
    MixtureBatch,
    MomentBatch,
    Moments,
    density_scores,
    fit_mixture,
    frechet_bounds,
    frechet_distance,
    grouped_mixture,
    log_densities,
    matched_frechet,
    mixture_density_scores,
    mixture_of,
    mixture_text_scores,
    moments_of,
    text_scores,
    woodbury,
)


def _features(rng: np.random.Generator, n: int = 400, d: int = 16, spread: float = 0.3) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) * spread / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_full_rank_moments_are_the_sample_mean_and_covariance() -> None:
    x = _features(np.random.default_rng(0))
    m = moments_of(x, rank=x.shape[1])
    np.testing.assert_allclose(m.mean, x.mean(0), atol=1e-6)
    np.testing.assert_allclose(m.covariance(), np.cov(x, rowvar=False), atol=1e-6)


def test_truncated_moments_keep_the_diagonal_and_the_top_eigenpairs() -> None:
    x = _features(np.random.default_rng(1), d=24)
    m = moments_of(x, rank=4)
    cov = np.cov(x, rowvar=False)
    np.testing.assert_allclose(np.diag(m.covariance()), np.diag(cov), atol=1e-6)
    top = np.linalg.eigvalsh(cov)[::-1][:4]
    np.testing.assert_allclose(np.linalg.eigvalsh(m.factor @ m.factor.T)[::-1][:4], top, rtol=1e-4)


def test_text_score_is_the_log_of_the_monte_carlo_mean_of_exp_tau_q_x() -> None:
    rng = np.random.default_rng(2)
    m = moments_of(_features(rng), rank=6)
    q = rng.normal(size=m.dim)
    q /= np.linalg.norm(q)
    tau = 8.0
    score = text_scores(MomentBatch.of([m]), q, tau)[0]
    draws = rng.multivariate_normal(m.mean, m.covariance(), size=400_000)
    values = np.exp(tau * draws @ q)
    estimate = np.log(values.mean())
    sampling_error = values.std() / np.sqrt(len(values)) / values.mean()  # delta method on the log
    assert abs(score - estimate) < 4 * sampling_error + 1e-6
    # ...and the quadratic term matters: the mean alone is off by far more than the sampling error.
    assert abs(tau * m.mean @ q - estimate) > 20 * sampling_error


def test_text_score_keeps_within_the_reach_of_the_samples_a_gaussian_was_fitted_from() -> None:
    """y = q.x ~ N(0.3, v) with tau sqrt(v) = 5, fitted from 32 samples: the score is the moment-generating
    function of y truncated at 0.3 + sqrt(2 ln 32 v) (checked by Monte Carlo), and it lands near what
    log mean exp(tau y_i) over 32 real samples gives, where the whole Gaussian's score lies 5 nats above."""
    rng = np.random.default_rng(3)
    d, tau, n, spread = 8, 25.0, 32, 0.2
    mean, q = np.eye(d, dtype=np.float32)[0] * 0.3, np.eye(d)[0]
    factor, diag = np.eye(d, 1, dtype=np.float32) * spread, np.full(d, 1e-4, np.float32)
    truncated = text_scores(MomentBatch.of([Moments(mean, factor, diag, n)]), q, tau)[0]
    whole = text_scores(MomentBatch.from_arrays(mean[None], factor[None], diag[None]), q, tau)[0]
    sd = np.sqrt(spread**2 + 1e-4)
    y = rng.normal(0.3, sd, 1_000_000)
    kept = y[y <= 0.3 + np.sqrt(2 * np.log(n)) * sd]
    assert truncated == pytest.approx(np.log(np.mean(np.exp(tau * kept))), abs=0.01)
    over_samples = np.log(np.mean(np.exp(tau * rng.normal(0.3, sd, (4000, n))), axis=1)).mean()
    assert abs(truncated - over_samples) < 1
    assert whole - over_samples > 4


@pytest.mark.parametrize("rank", [0, 3, 16])
def test_density_score_equals_the_dense_gaussian_log_density(rank: int) -> None:
    rng = np.random.default_rng(3)
    models = [moments_of(_features(rng), rank=rank) for _ in range(3)]
    q = rng.normal(size=16)
    q /= np.linalg.norm(q)
    scores = density_scores(MomentBatch.of(models), q, eps=1e-3)
    expected = [multivariate_normal(m.mean, m.covariance() + 1e-3 * np.eye(16)).logpdf(q) for m in models]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(4)
    a, b = moments_of(_features(rng), rank=5), moments_of(_features(rng, spread=0.6), rank=5)
    sa, sb = a.covariance().astype(np.float64), b.covariance().astype(np.float64)
    cross = scipy.linalg.sqrtm(sa @ sb).real
    expected = np.sum((a.mean - b.mean) ** 2) + np.trace(sa) + np.trace(sb) - 2 * np.trace(cross)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def _two_cluster_features(rng: np.random.Generator, n: int = 300, d: int = 16) -> np.ndarray:
    centres = rng.normal(size=(2, d))
    x = np.concatenate([c + rng.normal(size=(n // 2, d)) * 0.15 for c in centres])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _mixture_draws(mix: Mixture, rng: np.random.Generator, n: int) -> np.ndarray:
    which = rng.choice(mix.components, size=n, p=mix.weights / mix.weights.sum())
    draws = np.empty((n, mix.dim))
    for k in range(mix.components):
        chosen = which == k
        cov = mix.component(k).covariance().astype(np.float64)
        draws[chosen] = rng.multivariate_normal(mix.mean[k], cov, size=int(chosen.sum()))
    return draws


def test_mixture_text_score_is_the_monte_carlo_log_mean_of_exp_tau_q_x_within_one_percent() -> None:
    rng = np.random.default_rng(5)
    x = _two_cluster_features(rng)
    mix = grouped_mixture(x, np.repeat([0, 1], 150), rank=4)
    mix = Mixture(np.array([0.8, 0.2], np.float32), mix.mean, mix.factor, mix.diag, mix.count)
    # q points at the smaller cluster: the score is then far from what the mean alone or one Gaussian says
    q = mix.mean[1] / np.linalg.norm(mix.mean[1])
    tau = 10.0
    score = mixture_text_scores(MixtureBatch.of([mix]), q, tau)[0]
    estimate = np.log(np.mean(np.exp(tau * _mixture_draws(mix, rng, 100_000) @ q)))
    assert abs(score - estimate) <= 0.01 * abs(estimate)
    # ...which averaging the components' log scores (Jensen's gap) misses by far more than 1%
    averaged = mix.weights @ text_scores(MixtureBatch.of([mix]).components, q, tau)
    assert abs(averaged - estimate) > 0.1 * abs(estimate)


def test_collapsed_mixture_has_the_pooled_mean_and_covariance() -> None:
    rng = np.random.default_rng(6)
    x = _two_cluster_features(rng, d=8)
    mix = grouped_mixture(x, np.repeat([0, 1], 150), rank=8)
    pooled = mix.collapsed()
    np.testing.assert_allclose(pooled.mean, x.mean(0), atol=1e-6)
    within = sum(0.5 * np.cov(g, rowvar=False) for g in (x[:150], x[150:]))  # each group's own covariance
    between = 0.5 * sum(np.outer(m - x.mean(0), m - x.mean(0)) for m in (x[:150].mean(0), x[150:].mean(0)))
    np.testing.assert_allclose(pooled.covariance(), within + between, atol=1e-5)
    batch = MixtureBatch.of([mix, mixture_of([moments_of(x, 3)], [len(x)])]).collapsed()
    np.testing.assert_allclose(batch.mean[0].numpy(), pooled.mean, atol=1e-6)
    dense = batch.factor[0].double() @ batch.factor[0].double().T + torch.diag(batch.diag[0].double())
    np.testing.assert_allclose(dense.numpy(), pooled.covariance(), atol=1e-5)


def test_mixture_density_equals_the_dense_mixture_density() -> None:
    rng = np.random.default_rng(7)
    x = _two_cluster_features(rng)
    mixes = [grouped_mixture(x, np.repeat([0, 1], 150), rank=3), mixture_of([moments_of(x, 3)], [len(x)])]
    q = x[3]
    scores = mixture_density_scores(MixtureBatch.of(mixes), q, eps=1e-3)
    for mix, score in zip(mixes, scores, strict=True):
        dense = sum(
            w * multivariate_normal(mix.mean[k], mix.component(k).covariance() + 1e-3 * np.eye(16)).pdf(q)
            for k, w in enumerate(mix.weights)
        )
        assert score == pytest.approx(np.log(dense), rel=1e-5)


def test_held_out_likelihood_finds_two_clusters_and_keeps_one_gaussian_for_one() -> None:
    rng = np.random.default_rng(8)
    assert fit_mixture(_two_cluster_features(rng), rank=2, max_components=4).components == 2
    gaussian = rng.normal(size=(300, 16)) @ (rng.normal(size=(16, 16)) * 0.05) + rng.normal(size=16)
    assert fit_mixture(gaussian, rank=2, max_components=4).components == 1
    assert fit_mixture(_two_cluster_features(rng), rank=2, max_components=1).components == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_samples_of_tight_clusters_still_get_components_whose_text_score_follows_the_samples(seed: int) -> None:
    """128 samples of three tight clusters at d = 64, rank 16, as a GAN of the shapes world is indexed. BIC
    keeps one Gaussian there (each component costs some 1,030 parameters), whose variance term puts the
    paper's text score at a cluster's centre 16 or more above log mean exp(tau q.x) over the samples
    themselves (kept within the samples' reach, still 7 above)."""
    rng = np.random.default_rng(seed)
    tau = 15.0
    centres = rng.normal(size=(3, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, 3, 128)] * 0.8 + rng.normal(size=(128, 64)) * 0.02
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fitted = MixtureBatch.of([fit_mixture(x, rank=16, max_components=8)])
    single = MixtureBatch.of([mixture_of([moments_of(x, 16)], [len(x)])])
    for q in centres:
        over_the_samples = np.log(np.mean(np.exp(tau * x @ q)))
        assert mixture_text_scores(fitted, q, tau)[0] == pytest.approx(over_the_samples, abs=0.1)
        assert text_scores(single.collapsed(), q, tau)[0] > over_the_samples + 10


def test_frechet_bound_is_above_the_exact_distance_and_zero_on_itself() -> None:
    rng = np.random.default_rng(9)
    models = [moments_of(_features(rng, spread=s), rank=4) for s in (0.2, 0.5, 0.9)]
    batch = MomentBatch.of(models)
    bounds = frechet_bounds(batch, batch)
    for i, a in enumerate(models):
        assert bounds[i, i] == pytest.approx(0.0, abs=1e-5)
        for j, b in enumerate(models):
            assert bounds[i, j] >= frechet_distance(a, b) - 1e-5
    mixes = [mixture_of([m], [10]) for m in models]
    distances = matched_frechet(mixes[0], MixtureBatch.of(mixes))
    assert distances[0] == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(distances[1:], bounds[0, 1:], rtol=1e-6)


def test_precomputed_cholesky_factors_give_the_same_density() -> None:
    rng = np.random.default_rng(10)
    models = [moments_of(_features(rng, spread=s), rank=5) for s in (0.2, 0.5, 0.9)]
    batch = MomentBatch.of(models)
    chol, logdet = woodbury(batch.factor, batch.diag)
    cached = MomentBatch(batch.mean, batch.factor, batch.diag, chol.float(), logdet)
    q = _features(rng, n=2)
    np.testing.assert_allclose(log_densities(cached, q), log_densities(batch, q), rtol=1e-5)
