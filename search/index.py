"""The on-disk search index for one encoder and one modality: FAISS over the mixture components' means,
moments memory-mapped.

    <home>/search/<encoder hash[:16]>-<modality>/
        meta.json      encoder, modality, FAISS kind and the database fingerprint it was built from
        rows.npy       (n,) embedding row ids (int64, ascending), one per indexed version
        starts.npy     (n + 1,) int64: the components of rows[i] are starts[i] .. starts[i + 1] - 1
        weights.npy    (N,) float64   log mixture weights of the N components
        means.npy      (N, d) float32 component means (FAISS id = component; see below for what FAISS holds)
        factors.npy    (N, d, r) float32  covariance factors, read only for the candidates (float32, not the
                       database's float16: widening float16 costs more per query than reading twice the bytes)
        diags.npy      (N, d) float32
        chols.npy      (N, r, r) float32  Cholesky factors for the log-density (moments.woodbury)
        logdets.npy    (N,) float64   log det(Sigma + eps I) for the log-density
        samples.npy    (N,) float64   how many samples each component was fitted from (its text score's reach)
        index.faiss

Images and texts have separate indexes: CLIP's image and text features lie in different regions (the
modality gap), so one ranking across both would mean nothing.

It is a cache of the `embeddings` table: `fingerprint` (count, max id, sum of ids of the encoder's rows;
rows are only ever inserted or deleted, and ids are not reused while larger ones exist) decides whether it
is current, and a missing, damaged or stale index is rebuilt from the database, never trusted. Builds go
to a temporary sibling folder that replaces the old one by rename, so readers never see half an index.

Candidates come from FAISS by inner product, one vector per component mapped back to its version: the
unit-normalised mean followed by two numbers, WEIGHT_SCALE log w_k and tr(Sigma_k)/d (the log weight and
the mean variance). A text query searches with [q, 1/(WEIGHT_SCALE tau), tau/2], so the inner product is
q.mu_k + log w_k / tau + tau/2 tr(Sigma_k)/d, the component's share of the text score divided by tau with
q^T Sigma_k q replaced by its average over directions (without it, components of small weight or wide
variance are missed); image and model queries search with [q, 0, 0], the inner product with the mean
alone. WEIGHT_SCALE keeps the log weight (down to about -7) from outweighing the mean's coordinates when
the inverted file clusters the vectors. An exact flat index up to `FLAT_LIMIT` components, an
inverted-file index with 8-bit scalar quantisation above (sqrt(N) lists, trained on 64 points per list;
the exact rerank corrects the quantisation), searched with `DEFAULT_NPROBE` lists. The vectors are padded
with zeros to a multiple of `SIMD_WIDTH` coordinates: FAISS decodes 8-bit codes with SIMD only for such
widths, and d + 2 = 130 scanned 7 times slower than 144 (7.1 against 0.9 ms per query at 4.5 million
components, one thread).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from modelzoo.search.moments import MixtureBatch, woodbury

FLAT_LIMIT = 50_000
DEFAULT_NPROBE = 24
TRAIN_POINTS_PER_LIST = 64
INDEX_FORMAT = 5
WEIGHT_SCALE = 0.01
SIMD_WIDTH = 16


@dataclass(frozen=True)
class Fingerprint:
    count: int
    max_id: int
    id_sum: int


@dataclass
class MomentIndex:
    directory: Path
    encoder_hash: str
    modality: str
    rows: np.ndarray
    starts: np.ndarray
    log_weights: np.ndarray
    means: np.ndarray
    factors: np.ndarray
    diags: np.ndarray
    chols: np.ndarray
    logdets: np.ndarray
    samples: np.ndarray
    faiss_index: faiss.Index
    fingerprint: Fingerprint
    kind: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def owner(self) -> np.ndarray:
        """(N,) the row position each component belongs to."""
        return np.repeat(np.arange(len(self.rows)), np.diff(self.starts))

    def components_of(self, positions: np.ndarray) -> np.ndarray:
        """Component ids of the versions at `positions`, in order, each version's contiguous."""
        counts = self.starts[positions + 1] - self.starts[positions]
        first = np.repeat(self.starts[positions] - np.cumsum(counts) + counts, counts)
        return first + np.arange(int(counts.sum()))

    def candidates(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Sorted row positions of the versions to rerank for query `vectors` (`search_vector`),
        restricted to the positions in `allowed`: the owners of the `k` best components by inner product
        with each vector, taken best first until their components number k per vector. The budget is
        counted in components because reranking reads and scores every component of a version: counted in
        versions, a mixture index (K up to 8) reranked 5.5 times the components of a single-Gaussian one
        and took 2.5 times as long."""
        if len(self) == 0 or k < 1:
            return np.zeros(0, np.int64)
        params = None
        if allowed is not None:
            if len(allowed) == 0:
                return np.zeros(0, np.int64)
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(self.components_of(allowed), dtype=np.int64))
            params = (
                faiss.SearchParametersIVF(sel=selector, nprobe=DEFAULT_NPROBE)
                if self.kind == "ivf"
                else faiss.SearchParameters(sel=selector)
            )
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=DEFAULT_NPROBE)
        queries = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        # A handful of query vectors gains nothing from a thread team, and faiss's OpenMP runtime is not
        # torch's: their spinning threads fight over the cores (measured: 70 ms instead of 2 ms per query).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            _, ids = self.faiss_index.search(queries, min(k, len(self.means)), params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        found = ids.T.ravel()  # every vector's best hit, then every vector's second, ...
        owners = np.searchsorted(self.starts, found[found >= 0], side="right") - 1
        _, first = np.unique(owners, return_index=True)
        ranked = owners[np.sort(first)]
        counts = self.starts[ranked + 1] - self.starts[ranked]
        taken = ranked[np.cumsum(counts) - counts < k * len(queries)]
        return np.sort(taken).astype(np.int64)  # memory-mapped reads go in file order

    def moments(self, positions: np.ndarray) -> MixtureBatch:
        """The mixtures at sorted row `positions`, reading only their rows of the memory-mapped arrays."""
        comps = self.components_of(positions)
        owner = np.repeat(np.arange(len(positions)), self.starts[positions + 1] - self.starts[positions])
        return MixtureBatch.from_arrays(self.means[comps], self.factors[comps], self.diags[comps],
                                        self.log_weights[comps], owner, len(positions), self.chols[comps],
                                        self.logdets[comps], self.samples[comps])

    def positions_of(self, embedding_ids: np.ndarray) -> np.ndarray:
        """Row positions of those of `embedding_ids` that the index holds."""
        ids = np.asarray(embedding_ids, dtype=np.int64)
        where = np.searchsorted(self.rows, ids)
        inside = where < len(self.rows)
        where, ids = where[inside], ids[inside]
        return where[self.rows[where] == ids]


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def faiss_width(dim: int) -> int:
    """How many coordinates FAISS holds per component for d = `dim`: d + 2, padded to SIMD_WIDTH."""
    return -(-(dim + 2) // SIMD_WIDTH) * SIMD_WIDTH


def search_vector(query: np.ndarray, text_tau: float | None) -> np.ndarray:
    """What FAISS searches with for a (d,) query: [q, 1/(WEIGHT_SCALE tau), tau/2] for a text query, else
    [q, 0, 0], then zeros up to `faiss_width`."""
    q = np.asarray(query, dtype=np.float32)
    vector = np.zeros(faiss_width(len(q)), np.float32)
    vector[: len(q)] = q
    if text_tau is not None:
        vector[len(q) : len(q) + 2] = 1 / (WEIGHT_SCALE * text_tau), text_tau / 2
    return vector


def _write_factors(directory: Path, factors: np.ndarray, diags: np.ndarray) -> np.ndarray:
    """factors.npy in float32, chols.npy and logdets.npy, in chunks (`factors` may be a large
    memory-mapped array); returns each component's trace(Sigma_k)."""
    n, d, r = factors.shape
    out = np.lib.format.open_memmap(directory / "factors.npy", "w+", np.float32, (n, d, r))
    chols = np.lib.format.open_memmap(directory / "chols.npy", "w+", np.float32, (n, r, r))
    logdets = np.lib.format.open_memmap(directory / "logdets.npy", "w+", np.float64, (n,))
    traces = np.empty(n)
    for start in range(0, n, 16_384):
        part = np.asarray(factors[start : start + 16_384], dtype=np.float32)
        out[start : start + len(part)] = part
        diag = torch.from_numpy(np.asarray(diags[start : start + len(part)], dtype=np.float32))
        chol, logdet = woodbury(torch.from_numpy(part), diag)
        chols[start : start + len(part)] = chol.float().numpy()
        logdets[start : start + len(part)] = logdet.numpy()
        traces[start : start + len(part)] = np.square(part).sum((1, 2)) + diag.double().sum(1).numpy()
    for array, name in ((out, "factors.npy"), (chols, "chols.npy"), (logdets, "logdets.npy")):
        array.flush()
        with open(directory / name, "rb+") as f:
            os.fsync(f.fileno())
    del out, chols, logdets
    return traces


def build_faiss(means: np.ndarray) -> tuple[faiss.Index, str]:
    n, d = means.shape
    if n <= FLAT_LIMIT:
        index = faiss.IndexFlatIP(d)
        index.add(means)
        return index, "flat"
    lists = max(256, int(math.sqrt(n)))
    index = faiss.index_factory(d, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    picked = np.sort(np.random.default_rng(0).choice(n, min(n, TRAIN_POINTS_PER_LIST * lists), replace=False))
    sample = means[picked]
    index.train(np.ascontiguousarray(sample))
    for start in range(0, n, 100_000):  # bounded temporaries when `means` is memory-mapped
        index.add(np.ascontiguousarray(means[start : start + 100_000]))
    return index, "ivf"


def write_index(
    directory: Path,
    encoder_hash: str,
    modality: str,
    fingerprint: Fingerprint,
    rows: np.ndarray,
    starts: np.ndarray,
    log_weights: np.ndarray,
    means: np.ndarray,
    factors: np.ndarray,
    diags: np.ndarray,
    samples: np.ndarray,
) -> MomentIndex:
    """Write a complete index next to `directory`, then move it into place: `rows` (n,) embedding ids,
    `starts` (n + 1,) their components' offsets into the (N, ...) component arrays."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.build-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        means = np.ascontiguousarray(means, dtype=np.float32)
        traces = _write_factors(staging, factors, diags)
        d = means.shape[1]
        vectors = np.zeros((len(means), faiss_width(d)), np.float32)
        vectors[:, :d] = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        vectors[:, d] = WEIGHT_SCALE * np.asarray(log_weights)
        vectors[:, d + 1] = traces / d
        index, kind = build_faiss(vectors)
        del vectors
        _write_npy(staging / "rows.npy", np.asarray(rows, dtype=np.int64))
        _write_npy(staging / "starts.npy", np.asarray(starts, dtype=np.int64))
        _write_npy(staging / "weights.npy", np.asarray(log_weights, dtype=np.float64))
        _write_npy(staging / "means.npy", means)
        _write_npy(staging / "diags.npy", np.asarray(diags, dtype=np.float32))
        _write_npy(staging / "samples.npy", np.asarray(samples, dtype=np.float64))
        faiss.write_index(index, str(staging / "index.faiss"))
        meta = {
            "format": INDEX_FORMAT, "encoder_hash": encoder_hash, "modality": modality, "kind": kind,
            "count": len(rows), "components": len(means),
            "fingerprint": [fingerprint.count, fingerprint.max_id, fingerprint.id_sum],
        }
        (staging / "meta.json").write_text(json.dumps(meta))
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        if directory.exists():
            directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    opened = open_index(directory, encoder_hash, modality)
    assert opened is not None
    return opened


INDEX_FILES = (
    "meta.json", "rows.npy", "starts.npy", "weights.npy", "means.npy", "factors.npy", "diags.npy", "chols.npy",
    "logdets.npy", "samples.npy", "index.faiss",
)
_opened: dict[Path, tuple[tuple[tuple[int, int, int], ...], MomentIndex]] = {}
"""Indexes already read by this process, with the state of their files when read: a long-lived process
searching many times reads a large FAISS file once, not once per query."""


def _file_state(directory: Path) -> tuple[tuple[int, int, int], ...] | None:
    try:
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (os.stat(directory / n) for n in INDEX_FILES))
    except OSError:
        return None


def open_index(directory: Path, encoder_hash: str, modality: str) -> MomentIndex | None:
    """The index in `directory`, or None when it is missing, unreadable, of another encoder or format,
    or inconsistent (the caller then rebuilds it from the database). Reuses this process's copy while
    none of the index's files has changed on disk."""
    state = _file_state(directory)
    if state is None:
        return None
    cached = _opened.get(directory)
    if cached is not None and cached[0] == state and (cached[1].encoder_hash, cached[1].modality) == (
        encoder_hash, modality
    ):
        return cached[1]
    index = _read_index(directory, encoder_hash, modality)
    if index is not None:
        _opened[directory] = (state, index)
    return index


def _read_index(directory: Path, encoder_hash: str, modality: str) -> MomentIndex | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if (meta.get("format"), meta.get("encoder_hash"), meta.get("modality")) != (
            INDEX_FORMAT, encoder_hash, modality
        ):
            return None
        rows = np.load(directory / "rows.npy", allow_pickle=False)
        starts = np.load(directory / "starts.npy", allow_pickle=False)
        log_weights = np.load(directory / "weights.npy", allow_pickle=False)
        means = np.load(directory / "means.npy", mmap_mode="r", allow_pickle=False)
        factors = np.load(directory / "factors.npy", mmap_mode="r", allow_pickle=False)
        diags = np.load(directory / "diags.npy", mmap_mode="r", allow_pickle=False)
        chols = np.load(directory / "chols.npy", mmap_mode="r", allow_pickle=False)
        logdets = np.load(directory / "logdets.npy", mmap_mode="r", allow_pickle=False)
        samples = np.load(directory / "samples.npy", allow_pickle=False)
        index = faiss.read_index(str(directory / "index.faiss"))
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError):
        return None
    n, N = len(rows), len(means)
    consistent = (
        means.ndim == 2 and factors.ndim == 3 and diags.shape == means.shape and starts.shape == (n + 1,)
        and log_weights.shape == (N,) and len(factors) == N and factors.shape[1] == means.shape[1]
        and chols.shape == (N, factors.shape[2], factors.shape[2]) and logdets.shape == (N,)
        and samples.shape == (N,)
        and index.ntotal == N and index.d == faiss_width(means.shape[1]) and meta.get("count") == n and n > 0
        and starts[0] == 0 and starts[-1] == N
        and bool(np.all(np.diff(starts) > 0))
    )
    if not consistent:
        return None
    fingerprint = Fingerprint(*meta["fingerprint"])
    return MomentIndex(directory, encoder_hash, modality, rows, starts, log_weights, means, factors, diags, chols,
                       logdets, samples, index, fingerprint, meta["kind"])
