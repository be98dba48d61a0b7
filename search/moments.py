"""First and second moments of a model's sample embeddings, and the Modelverse scores computed from them.

A model is summarised by the Gaussian N(mu, Sigma) of its samples' L2-normalised CLIP features
(Lu et al., "Content-Based Search for Deep Generative Models", 2023). Sigma is kept as a rank-r factor
plus a diagonal, Sigma ~= L L^T + diag(D): L holds the top-r eigenvectors scaled by the square roots of
their eigenvalues, and D the variance those leave unexplained, so the diagonal (and the trace) of the
sample covariance is kept exactly. At d = 512 and r = 32 that is 17x smaller than the full matrix, and
every score below costs O(d r) per model instead of O(d^2) or O(d^3).

The scores, all "higher is better" and all log-scale so that several queries add up:
- text: the log moment-generating function, tau q.mu + tau^2/2 q^T Sigma q = log E[exp(tau q.x)] for
  x ~ N(mu, Sigma), with tau CLIP's logit scale;
- image or sketch: the Gaussian log-density log N(q; mu, Sigma + eps I), eps = 1e-3 as Modelverse;
- another model: minus the Frechet distance between the two Gaussians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

DENSITY_EPS = 1e-3
"""Added to Sigma's diagonal for the image score (Modelverse's `modelsearch/retrieval.py`)."""


@dataclass(frozen=True)
class Moments:
    """mean (d,), factor L (d, r) and residual diagonal D (d,): Sigma ~= L L^T + diag(D); float32."""

    mean: np.ndarray
    factor: np.ndarray
    diag: np.ndarray
    count: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.factor.shape[1])

    def covariance(self) -> np.ndarray:
        """The dense (d, d) matrix the factors stand for."""
        return self.factor @ self.factor.T + np.diag(self.diag)


def moments_of(features: np.ndarray, rank: int) -> Moments:
    """The moments of (n, d) features: the mean and the sample covariance (n - 1 in the denominator, as
    numpy's `cov`, which Modelverse uses), truncated to its top `rank` eigenpairs plus the diagonal."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least two feature vectors to estimate a covariance, got shape {features.shape}")
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float64))
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / (len(x) - 1)
    rank = max(0, min(rank, cov.shape[0]))
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, vectors = values.flip(0)[:rank].clamp_min(0), vectors.flip(1)[:, :rank]
    factor = vectors * values.sqrt()
    diag = (cov.diagonal() - factor.pow(2).sum(1)).clamp_min(0)
    return Moments(mean.float().numpy(), factor.float().numpy(), diag.float().numpy(), len(features))


@dataclass(frozen=True)
class MomentBatch:
    """Moments of C models stacked for scoring: mean (C, d), factor (C, d, r), diag (C, d); float32
    tensors (factors may arrive as float16 from the on-disk index and are widened here)."""

    mean: torch.Tensor
    factor: torch.Tensor
    diag: torch.Tensor

    @classmethod
    def of(cls, moments: list[Moments]) -> MomentBatch:
        rank = max((m.rank for m in moments), default=0)
        factors = [np.pad(m.factor, ((0, 0), (0, rank - m.rank))) for m in moments]
        means, diags = np.stack([m.mean for m in moments]), np.stack([m.diag for m in moments])
        return cls.from_arrays(means, np.stack(factors), diags)

    @classmethod
    def from_arrays(cls, mean: np.ndarray, factor: np.ndarray, diag: np.ndarray) -> MomentBatch:
        as_float = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
        return cls(as_float(mean), as_float(factor), as_float(diag))

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def text_scores(batch: MomentBatch, query: np.ndarray, tau: float) -> np.ndarray:
    """log E[exp(tau q.x)] under each model's Gaussian: tau q.mu + tau^2/2 q^T Sigma q."""
    q = torch.from_numpy(np.asarray(query, dtype=np.float32))
    projected = torch.einsum("cdr,d->cr", batch.factor, q)
    quadratic = projected.pow(2).sum(1) + (batch.diag * q.pow(2)).sum(1)
    return (tau * (batch.mean @ q) + 0.5 * tau**2 * quadratic).numpy().astype(np.float64)


def density_scores(batch: MomentBatch, query: np.ndarray, eps: float = DENSITY_EPS) -> np.ndarray:
    """log N(q; mu, Sigma + eps I) for each model, through the Woodbury identity and the matrix
    determinant lemma on A + L L^T with A = diag(D) + eps: O(d r^2) per model, no d x d matrix."""
    q = torch.from_numpy(np.asarray(query, dtype=np.float64))
    a = batch.diag.double() + eps  # (C, d)
    factor = batch.factor.double()  # (C, d, r)
    delta = q - batch.mean.double()  # (C, d)
    scaled = factor / a.unsqueeze(-1)  # A^-1 L
    eye = torch.eye(factor.shape[-1], dtype=torch.float64, device=factor.device)
    inner = eye + factor.transpose(1, 2) @ scaled  # I + L^T A^-1 L
    chol = torch.linalg.cholesky(inner)
    u = torch.einsum("cdr,cd->cr", scaled, delta).unsqueeze(-1)  # L^T A^-1 delta
    solved = torch.cholesky_solve(u, chol).squeeze(-1)
    mahalanobis = (delta.pow(2) / a).sum(1) - (u.squeeze(-1) * solved).sum(1)
    logdet = a.log().sum(1) + 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)
    d = q.shape[0]
    return (-0.5 * (d * math.log(2 * math.pi) + logdet + mahalanobis)).numpy()


def frechet_distance(a: Moments, b: Moments) -> float:
    """||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2), in float64.

    The cross term is the sum of square roots of the eigenvalues of S_a^1/2 S_b S_a^1/2, a symmetric
    positive semi-definite matrix, so one symmetric eigendecomposition replaces scipy's sqrtm."""
    return frechet_distances(a, MomentBatch.of([b]))[0]


def frechet_distances(query: Moments, batch: MomentBatch) -> np.ndarray:
    """The Frechet distance from `query` to each model of `batch`."""
    cov_q = torch.from_numpy(query.covariance()).double()
    values, vectors = torch.linalg.eigh(cov_q)
    root_q = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    factor = batch.factor.double()
    covs = factor @ factor.transpose(1, 2) + torch.diag_embed(batch.diag.double())  # (C, d, d)
    middle = root_q @ covs @ root_q
    cross = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum(1)
    mean_gap = (batch.mean.double() - torch.from_numpy(query.mean).double()).pow(2).sum(1)
    traces = covs.diagonal(dim1=1, dim2=2).sum(1) + cov_q.trace()
    return (mean_gap + traces - 2 * cross).numpy()
