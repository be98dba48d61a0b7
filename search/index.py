"""The on-disk search index for one encoder: FAISS over the models' mean features, moments memory-mapped.

    <home>/search/<encoder hash[:16]>/
        meta.json      encoder, dimensions, FAISS kind and the database fingerprint it was built from
        rows.npy       embedding row ids (int64, ascending): FAISS id i is the embedding rows[i]
        means.npy      (n, d) float32   the means (FAISS holds them unit-normalised)
        factors.npy    (n, d, r) float16  covariance factors, read only for the candidates
        diags.npy      (n, d) float32
        index.faiss

It is a cache of the `embeddings` table: `fingerprint` (count, max id, sum of ids of the encoder's rows;
rows are only ever inserted or deleted, and ids are not reused while larger ones exist) decides whether it
is current, and a missing, damaged or stale index is rebuilt from the database, never trusted. Builds go
to a temporary sibling folder that replaces the old one by rename, so readers never see half an index.

Candidates come from FAISS by inner product with the normalised means: an exact flat index up to
`FLAT_LIMIT` models, an inverted-file index with 8-bit scalar quantisation above (sqrt(n) lists, trained
on 64 points per list; the exact rerank corrects the quantisation), searched with `DEFAULT_NPROBE` lists.
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

from modelzoo.search.moments import MomentBatch

FLAT_LIMIT = 50_000
DEFAULT_NPROBE = 24
TRAIN_POINTS_PER_LIST = 64
INDEX_FORMAT = 1


@dataclass(frozen=True)
class Fingerprint:
    count: int
    max_id: int
    id_sum: int


@dataclass
class MomentIndex:
    directory: Path
    encoder_hash: str
    rows: np.ndarray
    means: np.ndarray
    factors: np.ndarray
    diags: np.ndarray
    faiss_index: faiss.Index
    fingerprint: Fingerprint
    kind: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def candidates(self, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
        """Row positions of the union of the `k` best means by inner product for each query vector,
        restricted to the positions in `allowed` when given."""
        if len(self) == 0 or k < 1:
            return np.zeros(0, np.int64)
        params = None
        if allowed is not None:
            if len(allowed) == 0:
                return np.zeros(0, np.int64)
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
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
            _, ids = self.faiss_index.search(queries, min(k, len(self)), params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        return np.unique(ids[ids >= 0]).astype(np.int64)  # sorted: memory-mapped reads go in file order

    def moments(self, positions: np.ndarray) -> MomentBatch:
        """The moments at sorted row `positions`, reading only those rows of the memory-mapped arrays."""
        return MomentBatch.from_arrays(self.means[positions], self.factors[positions], self.diags[positions])

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
    fingerprint: Fingerprint,
    rows: np.ndarray,
    means: np.ndarray,
    factors: np.ndarray,
    diags: np.ndarray,
) -> MomentIndex:
    """Write a complete index next to `directory`, then move it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.build-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        means = np.ascontiguousarray(means, dtype=np.float32)
        index, kind = build_faiss(means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12))
        _write_npy(staging / "rows.npy", np.asarray(rows, dtype=np.int64))
        _write_npy(staging / "means.npy", means)
        _write_npy(staging / "factors.npy", np.asarray(factors, dtype=np.float16))
        _write_npy(staging / "diags.npy", np.asarray(diags, dtype=np.float32))
        faiss.write_index(index, str(staging / "index.faiss"))
        meta = {
            "format": INDEX_FORMAT, "encoder_hash": encoder_hash, "kind": kind, "count": len(rows),
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
    opened = open_index(directory, encoder_hash)
    assert opened is not None
    return opened


INDEX_FILES = ("meta.json", "rows.npy", "means.npy", "factors.npy", "diags.npy", "index.faiss")
_opened: dict[Path, tuple[tuple[tuple[int, int, int], ...], MomentIndex]] = {}
"""Indexes already read by this process, with the state of their files when read: a long-lived process
searching many times reads a large FAISS file once, not once per query."""


def _file_state(directory: Path) -> tuple[tuple[int, int, int], ...] | None:
    try:
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (os.stat(directory / n) for n in INDEX_FILES))
    except OSError:
        return None


def open_index(directory: Path, encoder_hash: str) -> MomentIndex | None:
    """The index in `directory`, or None when it is missing, unreadable, of another encoder or format,
    or inconsistent (the caller then rebuilds it from the database). Reuses this process's copy while
    none of the index's files has changed on disk."""
    state = _file_state(directory)
    if state is None:
        return None
    cached = _opened.get(directory)
    if cached is not None and cached[0] == state and cached[1].encoder_hash == encoder_hash:
        return cached[1]
    index = _read_index(directory, encoder_hash)
    if index is not None:
        _opened[directory] = (state, index)
    return index


def _read_index(directory: Path, encoder_hash: str) -> MomentIndex | None:
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format") != INDEX_FORMAT or meta.get("encoder_hash") != encoder_hash:
            return None
        rows = np.load(directory / "rows.npy", allow_pickle=False)
        means = np.load(directory / "means.npy", mmap_mode="r", allow_pickle=False)
        factors = np.load(directory / "factors.npy", mmap_mode="r", allow_pickle=False)
        diags = np.load(directory / "diags.npy", mmap_mode="r", allow_pickle=False)
        index = faiss.read_index(str(directory / "index.faiss"))
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError):
        return None
    n = len(rows)
    consistent = (
        means.ndim == 2 and factors.ndim == 3 and diags.shape == means.shape and len(means) == n
        and len(factors) == n and factors.shape[1] == means.shape[1] and index.ntotal == n
        and meta.get("count") == n
    )
    if not consistent:
        return None
    fingerprint = Fingerprint(*meta["fingerprint"])
    return MomentIndex(directory, encoder_hash, rows, means, factors, diags, index, fingerprint, meta["kind"])
