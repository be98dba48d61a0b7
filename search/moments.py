"""Moments of a model's sample embeddings, as a Gaussian or a mixture of Gaussians, and the Modelverse
scores computed from them.

Modelverse (Lu et al., "Content-Based Search for Deep Generative Models", 2023) summarises a model by
the Gaussian N(mu, Sigma) of its samples' L2-normalised CLIP features. Each Gaussian here keeps Sigma
as a rank-r factor plus a diagonal, Sigma ~= L L^T + diag(D): L holds the top-r eigenvectors scaled by
the square roots of their eigenvalues, and D the variance those leave unexplained, so the diagonal (and
the trace) of the sample covariance is kept exactly. At d = 512 and r = 32 that is 17x smaller than the
full matrix, and every score below costs O(d r) per model instead of O(d^2) or O(d^3).

A broad model (a diffusion model trained on every slice of a world) has samples in several clusters; one
Gaussian gives it a large variance along every query, which the text score rewards. So a model is a
mixture sum_k w_k N(mu_k, Sigma_k) (`Mixture`; one component per index prompt for text-conditional
models, k-means with K chosen by held-out likelihood otherwise), and a single Gaussian is the K = 1 mixture.

The scores, all "higher is better" and all log-scale so that several queries add up:
- text or sketch: the log moment-generating function log E[exp(tau q.x)], tau CLIP's logit scale; for a
  Gaussian tau q.mu + tau^2/2 q^T Sigma q, for a mixture log sum_k w_k exp(tau q.mu_k + tau^2/2 q^T Sigma_k q)
  (Modelverse scores sketches as images; search/engine.py `SIMILARITY_KINDS` says why they are not here),
  each component's term kept within the reach of the samples it was fitted from (`text_scores`);
- image: the log-density, log sum_k w_k N(q; mu_k, Sigma_k + eps I), eps = 1e-3 as Modelverse;
- another model: minus the Frechet distance between two Gaussians, or minus `matched_frechet` between
  two mixtures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import special

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
    tensors."""

    mean: torch.Tensor
    factor: torch.Tensor
    diag: torch.Tensor
    chol: torch.Tensor | None = None
    """(C, r, r) Cholesky factors of I + L^T (D + eps I)^-1 L at eps = DENSITY_EPS (`woodbury`), when
    precomputed: the image score then costs O(d r) per model, as the text score does."""
    logdet: torch.Tensor | None = None
    """(C,) log det(Sigma + eps I) at eps = DENSITY_EPS, precomputed with `chol`."""
    samples: torch.Tensor | None = None
    """(C,) how many samples each Gaussian was fitted from; the text score then stays within their reach
    (`text_scores`). None scores the whole Gaussian, as Modelverse does."""

    @classmethod
    def of(cls, moments: list[Moments]) -> MomentBatch:
        rank = max((m.rank for m in moments), default=0)
        factors = [np.pad(m.factor, ((0, 0), (0, rank - m.rank))) for m in moments]
        means, diags = np.stack([m.mean for m in moments]), np.stack([m.diag for m in moments])
        return cls.from_arrays(means, np.stack(factors), diags, samples=np.array([m.count for m in moments]))

    @classmethod
    def from_arrays(
        cls, mean: np.ndarray, factor: np.ndarray, diag: np.ndarray, chol: np.ndarray | None = None,
        logdet: np.ndarray | None = None, samples: np.ndarray | None = None,
    ) -> MomentBatch:
        as_float = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
        as_double = lambda a: None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
        return cls(as_float(mean), as_float(factor), as_float(diag), None if chol is None else as_float(chol),
                   as_double(logdet), as_double(samples))

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def text_scores(batch: MomentBatch, query: np.ndarray, tau: float) -> np.ndarray:
    """log E[exp(tau y)] for y = q.x under each model's Gaussian, y ~ N(m, v): tau m + tau^2/2 v, the
    Modelverse score. With `batch.samples`, y is the Gaussian truncated where the n samples it was fitted
    from reach, y <= m + a sqrt(v) with a = sqrt(2 ln n) (about the largest of n standard normal draws):

        tau m + tau^2/2 v + log Phi(a - tau sqrt(v)) - log Phi(a).

    The whole Gaussian's score is carried by its tail around m + tau v, which lies tau sqrt(v) standard
    deviations out; where that is beyond a, the score rests on samples nobody drew. For tau sqrt(v) >> a
    the truncated score tends to tau (m + a sqrt(v)) - ln n, what log mean exp(tau y_i) over the samples
    gives when the best one dominates. A broad component of a diffusion model (tau sqrt(v) 4.3 against a 2.6
    for 32 samples) outscored the specialist GAN by 1.9 through its variance; truncated, it loses 3 nats."""
    q = torch.from_numpy(np.asarray(query, dtype=np.float32))
    projected = q @ batch.factor  # (C, r); a batched matrix product, 20x faster than the einsum
    quadratic = (projected.pow(2).sum(1) + (batch.diag * q.pow(2)).sum(1)).double()
    scores = tau * (batch.mean @ q).double() + 0.5 * tau**2 * quadratic
    if batch.samples is not None:
        reach = (2 * batch.samples.clamp_min(2).log()).sqrt()
        scores = scores + special.log_ndtr(reach - tau * quadratic.sqrt()) - special.log_ndtr(reach)
    return scores.numpy()


def density_scores(batch: MomentBatch, query: np.ndarray, eps: float = DENSITY_EPS) -> np.ndarray:
    """log N(q; mu, Sigma + eps I) for each model."""
    return log_densities(batch, np.asarray(query)[None], eps)[0]


def woodbury(factor: torch.Tensor, diag: torch.Tensor, eps: float = DENSITY_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """What the log-density of each model needs that does not depend on the query, in float64: the
    (C, r, r) lower Cholesky factors of I + L^T A^-1 L, A = diag(D) + eps, and (C,) log det(A + L L^T)
    by the matrix determinant lemma."""
    a = diag.double() + eps
    factor = factor.double()
    eye = torch.eye(factor.shape[-1], dtype=torch.float64, device=factor.device)
    chol = torch.linalg.cholesky(eye + factor.transpose(1, 2) @ (factor / a.unsqueeze(-1)))
    return chol, a.log().sum(1) + 2 * chol.diagonal(dim1=1, dim2=2).log().sum(1)


def log_densities(batch: MomentBatch, queries: np.ndarray, eps: float = DENSITY_EPS) -> np.ndarray:
    """log N(q_i; mu_c, Sigma_c + eps I) for (n, d) queries and C models, (n, C), through the Woodbury
    identity and the matrix determinant lemma on A + L L^T with A = diag(D) + eps: O(d r^2) per model,
    no d x d matrix, in float64. With the Cholesky factors precomputed (`MomentBatch.chol`, as the search
    index stores them) it is O(d r) per model, in float32 up to the final sums (the rerank's hot path;
    the two Mahalanobis terms are summed in float64 where they cancel)."""
    cached = batch.chol is not None and batch.logdet is not None and eps == DENSITY_EPS
    dtype = torch.float32 if cached else torch.float64
    q = torch.from_numpy(np.asarray(queries)).to(dtype)  # (n, d)
    a = batch.diag.to(dtype) + eps  # (C, d)
    delta = q[:, None, :] - batch.mean.to(dtype)[None]  # (n, C, d)
    whitened = delta / a  # A^-1 delta
    if cached:
        assert batch.chol is not None and batch.logdet is not None
        chol, logdet = batch.chol, batch.logdet
    else:
        chol, logdet = woodbury(batch.factor, batch.diag, eps)
    u = whitened.permute(1, 0, 2) @ batch.factor.to(dtype)  # L^T A^-1 delta, (C, n, r)
    solved = torch.cholesky_solve(u.transpose(1, 2), chol.to(dtype)).transpose(1, 2)
    mahalanobis = (delta * whitened).sum(-1).double() - (u * solved).sum(-1).T.double()
    d = q.shape[1]
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


@dataclass(frozen=True)
class Mixture:
    """K Gaussian components of one model's features: weights (K,) summing to one, and the stacked
    moments mean (K, d), factor (K, d, r), diag (K, d); a single Gaussian is the K = 1 mixture."""

    weights: np.ndarray
    mean: np.ndarray
    factor: np.ndarray
    diag: np.ndarray
    count: int

    @property
    def components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.mean.shape[1])

    @property
    def rank(self) -> int:
        return int(self.factor.shape[2])

    def component(self, k: int) -> Moments:
        return Moments(self.mean[k], self.factor[k], self.diag[k], self.count)

    def collapsed(self) -> Moments:
        """The single Gaussian with the mixture's mean and covariance (moment matching):
        mu = sum_k w_k mu_k, Sigma = sum_k w_k (Sigma_k + (mu_k - mu)(mu_k - mu)^T), kept exactly as the
        factor [sqrt(w_k) L_k, sqrt(w_k) (mu_k - mu)]_k (rank K (r + 1)) plus diag sum_k w_k D_k."""
        w = self.weights.astype(np.float64)
        mean = w @ self.mean
        roots = np.sqrt(w)
        spread = (self.mean - mean) * roots[:, None]  # (K, d)
        scaled = self.factor * roots[:, None, None]  # (K, d, r)
        factor = np.concatenate([scaled.transpose(1, 0, 2).reshape(self.dim, -1), spread.T], axis=1)
        return Moments(mean.astype(np.float32), factor.astype(np.float32), (w @ self.diag).astype(np.float32),
                       self.count)


def mixture_of(components: list[Moments], counts: list[int]) -> Mixture:
    """Stack per-group moments into a mixture weighted by the groups' sample counts."""
    rank = max(m.rank for m in components)
    factor = np.stack([np.pad(m.factor, ((0, 0), (0, rank - m.rank))) for m in components])
    weights = np.asarray(counts, dtype=np.float64)
    return Mixture((weights / weights.sum()).astype(np.float32), np.stack([m.mean for m in components]), factor,
                   np.stack([m.diag for m in components]), int(sum(counts)))


def grouped_mixture(features: np.ndarray, groups: np.ndarray, rank: int) -> Mixture:
    """One component per group label (a prompt, for text-conditional models), weighted by its share."""
    labels = list(dict.fromkeys(groups.tolist()))
    members = [features[groups == g] for g in labels]
    return mixture_of([moments_of(x, min(rank, len(x) - 1)) for x in members], [len(x) for x in members])


def kmeans(features: np.ndarray, K: int, seed: int = 0, restarts: int = 4, iterations: int = 60) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, the best of `restarts` runs; returns (n,) labels."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float64))
    generator = torch.Generator().manual_seed(seed)
    best_labels, best_cost = torch.zeros(len(x), dtype=torch.long, device=x.device), math.inf
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=generator)]
        while len(centres) < K:
            gap = torch.cdist(x, centres).min(1).values.pow(2)
            pick = torch.multinomial(gap + 1e-12, 1, generator=generator)
            centres = torch.cat([centres, x[pick]])
        for _ in range(iterations):
            labels = torch.cdist(x, centres).argmin(1)
            moved = torch.stack([x[labels == k].mean(0) if (labels == k).any() else centres[k] for k in range(K)])
            if torch.allclose(moved, centres):
                break
            centres = moved
        labels = torch.cdist(x, centres).argmin(1)
        cost = float(torch.cdist(x, centres).min(1).values.pow(2).sum())
        if cost < best_cost:
            best_labels, best_cost = labels, cost
    return best_labels.numpy()


def mixture_log_likelihood(mixture: Mixture, features: np.ndarray, eps: float = DENSITY_EPS) -> float:
    """sum_i log sum_k w_k N(x_i; mu_k, Sigma_k + eps I), the density the image score uses."""
    batch = MixtureBatch.of([mixture])
    per_component = torch.from_numpy(log_densities(batch.components, features, eps))  # (n, K)
    return float(torch.logsumexp(per_component + batch.log_weights, dim=1).sum())


MIN_COMPONENT_SAMPLES = 4
"""A k-means cluster smaller than this cannot give a covariance worth the name; such K are not tried."""


def _clustered(features: np.ndarray, K: int, rank: int, seed: int) -> Mixture | None:
    """K k-means clusters of `features` with each cluster's moments (hard-assignment EM's first step), or
    None when a cluster would hold fewer than MIN_COMPONENT_SAMPLES samples."""
    if K == 1:
        return mixture_of([moments_of(features, rank)], [len(features)])
    if len(features) < K * MIN_COMPONENT_SAMPLES:
        return None
    labels = kmeans(features, K, seed)
    if np.bincount(labels, minlength=K).min() < MIN_COMPONENT_SAMPLES:
        return None
    return grouped_mixture(features, labels, rank)


def fit_mixture(features: np.ndarray, rank: int, max_components: int, seed: int = 0) -> Mixture:
    """K in 1..max_components chosen by held-out likelihood: every other sample fits K clusters' moments,
    the others score them (`mixture_log_likelihood`), K grows until a cluster would be too small, and the K
    that scored highest is fitted again on all the samples.

    BIC chose K = 1 for every GAN of the shapes world (d = 64, rank 16: some 1,030 parameters a component
    against 128 samples), and that one Gaussian's tail let the red-square GAN outscore the red-circle one
    for "a red circle" (12.1 against 12.0, where over the samples themselves log mean exp(tau q.x) is 10.5
    against 11.7). Held out, the same GANs chose 2 to 4 components, whose text scores follow the samples'."""
    if max_components < 2 or len(features) < 2 * MIN_COMPONENT_SAMPLES:
        return mixture_of([moments_of(features, rank)], [len(features)])
    fitting, scoring = features[::2], features[1::2]
    held_out: dict[int, float] = {}
    for K in range(1, max_components + 1):
        candidate = _clustered(fitting, K, rank, seed)
        if candidate is None:
            break
        held_out[K] = mixture_log_likelihood(candidate, scoring)
    best = max(held_out, key=lambda K: held_out[K])
    for K in range(best, 0, -1):  # all the samples may split less evenly than half of them did
        mixture = _clustered(features, K, rank, seed)
        if mixture is not None:
            return mixture
    raise AssertionError("K = 1 always fits")


@dataclass(frozen=True)
class MixtureBatch:
    """The components of C mixtures, each model's components contiguous: `components` (N rows),
    `log_weights` (N,), `owner` (N,) the model (0..C-1) each component belongs to."""

    components: MomentBatch
    log_weights: torch.Tensor
    owner: torch.Tensor
    models: int

    @classmethod
    def of(cls, mixtures: list[Mixture]) -> MixtureBatch:
        rank = max((m.rank for m in mixtures), default=0)
        pad = lambda f: np.pad(f, ((0, 0), (0, 0), (0, rank - f.shape[2])))  # noqa: E731
        owner = np.repeat(np.arange(len(mixtures)), [m.components for m in mixtures])
        return cls.from_arrays(
            np.concatenate([m.mean for m in mixtures]), np.concatenate([pad(m.factor) for m in mixtures]),
            np.concatenate([m.diag for m in mixtures]), np.log(np.concatenate([m.weights for m in mixtures])),
            owner, len(mixtures), samples=np.concatenate([m.weights * m.count for m in mixtures]),
        )

    @classmethod
    def from_arrays(cls, mean: np.ndarray, factor: np.ndarray, diag: np.ndarray, log_weights: np.ndarray,
                    owner: np.ndarray, models: int, chol: np.ndarray | None = None,
                    logdet: np.ndarray | None = None, samples: np.ndarray | None = None) -> MixtureBatch:
        """`samples` (N,): how many samples each component was fitted from (see `text_scores`)."""
        return cls(MomentBatch.from_arrays(mean, factor, diag, chol, logdet, samples),
                   torch.from_numpy(np.asarray(log_weights, np.float64)), torch.from_numpy(np.asarray(owner, np.int64)),
                   models)

    def __len__(self) -> int:
        return self.models

    def logsumexp(self, per_component: torch.Tensor) -> np.ndarray:
        """log sum_k exp(log w_k + s_k) per model, stable: the per-model maximum is taken out first."""
        s = per_component.double() + self.log_weights
        top = torch.full((self.models,), -math.inf, dtype=torch.float64).scatter_reduce(0, self.owner, s, "amax")
        total = torch.zeros(self.models, dtype=torch.float64, device=s.device)
        total = total.index_add(0, self.owner, (s - top[self.owner]).exp())
        return (top + total.log()).numpy()

    def collapsed(self) -> MomentBatch:
        """Each model's moment-matched single Gaussian (Mixture.collapsed), stacked, without sample counts:
        the paper's summary, scored as the paper does."""
        c = self.components
        w = self.log_weights.exp()
        mean = torch.zeros(self.models, c.mean.shape[1], dtype=torch.float64, device=w.device).index_add(
            0, self.owner, w[:, None] * c.mean.double())
        diag = torch.zeros_like(mean).index_add(0, self.owner, w[:, None] * c.diag.double())
        counts = torch.bincount(self.owner, minlength=self.models)
        K, d, r = int(counts.max()), c.mean.shape[1], c.factor.shape[2]
        slot = torch.arange(len(self.owner)) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        roots = w.sqrt()
        factor = torch.zeros(self.models, K, d, r + 1, dtype=torch.float64, device=w.device)
        factor[self.owner, slot, :, :r] = c.factor.double() * roots[:, None, None]
        factor[self.owner, slot, :, r] = (c.mean.double() - mean[self.owner]) * roots[:, None]
        factor = factor.permute(0, 2, 1, 3).reshape(self.models, d, K * (r + 1))
        return MomentBatch(mean.float(), factor.float(), diag.float())


def mixture_text_scores(batch: MixtureBatch, query: np.ndarray, tau: float) -> np.ndarray:
    """log E[exp(tau q.x)] under each mixture: log sum_k w_k exp(tau q.mu_k + tau^2/2 q^T Sigma_k q)."""
    return batch.logsumexp(torch.from_numpy(text_scores(batch.components, query, tau)))


def mixture_density_scores(batch: MixtureBatch, query: np.ndarray, eps: float = DENSITY_EPS) -> np.ndarray:
    """log sum_k w_k N(q; mu_k, Sigma_k + eps I) for each mixture."""
    return batch.logsumexp(torch.from_numpy(density_scores(batch.components, query, eps)))


def frechet_bounds(a: MomentBatch, b: MomentBatch) -> np.ndarray:
    """An upper bound on the Frechet distance between every Gaussian of `a` and every one of `b`, (A, B),
    in O(d r^2) per pair instead of a d x d matrix square root.

    With Sigma = X X^T for X = [L, D^1/2], the cross term tr((S_a^1/2 S_b S_a^1/2)^1/2) is the nuclear
    norm of X_a^T X_b, and by the pinching inequality that norm is at least the sum of its diagonal
    blocks' norms, ||L_a^T L_b||_* + sum_i sqrt(D_a,i D_b,i). Using that sum overstates the distance
    only as far as the factors of one model correlate with the residual of the other; the bound is 0
    between identical Gaussians."""
    la, lb = a.factor.double(), b.factor.double()
    cross = torch.linalg.svdvals(torch.einsum("adr,bds->abrs", la, lb)).sum(-1)
    cross = cross + (a.diag.double().clamp_min(0).sqrt() @ b.diag.double().clamp_min(0).sqrt().T)
    traces_a = la.pow(2).sum((1, 2)) + a.diag.double().sum(1)
    traces_b = lb.pow(2).sum((1, 2)) + b.diag.double().sum(1)
    gap = torch.cdist(a.mean.double(), b.mean.double()).pow(2)
    return (gap + traces_a[:, None] + traces_b[None, :] - 2 * cross).clamp_min(0).numpy()


def matched_frechet(query: Mixture, batch: MixtureBatch) -> np.ndarray:
    """The distance from `query` to each mixture of `batch`: each component is matched to its nearest
    component of the other mixture by the Frechet bound above, and the two directions' weighted means
    are averaged, 1/2 [sum_i w_i min_j F(a_i, b_j) + sum_j v_j min_i F(a_i, b_j)]. It is 0 between
    identical mixtures, equals the (bounded) Frechet distance between single Gaussians, and is blind
    to how the weights of well-matched components differ."""
    costs = torch.from_numpy(frechet_bounds(MomentBatch.of([query.component(k) for k in range(query.components)]),
                                            batch.components))  # (Ka, N)
    w = torch.from_numpy(query.weights.astype(np.float64))
    nearest_b = torch.full((costs.shape[0], batch.models), math.inf, dtype=torch.float64)
    nearest_b = nearest_b.scatter_reduce(1, batch.owner.expand_as(costs), costs, "amin")  # (Ka, C)
    forward = (w[:, None] * nearest_b).sum(0)
    backward = torch.zeros(batch.models, dtype=torch.float64, device=forward.device).index_add(
        0, batch.owner, batch.log_weights.exp() * costs.min(0).values)
    return (0.5 * (forward + backward)).numpy()
