"""The Modelverse scores, pinned against direct computations that only the correct math matches."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.stats import multivariate_normal

from modelzoo.search.moments import (
    MomentBatch,
    density_scores,
    frechet_distance,
    moments_of,
    text_scores,
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
