"""Search latency, recall and build cost at 10^3 ... 10^6 models, mixtures against single Gaussians and a
Modelverse-style Python loop.

Synthetic models stand in for indexed versions: d = 512 unit-normalised component means drawn around
2,000 "concept" directions (real model zoos are clustered: many fine-tunes of a few bases), each with a
rank-r covariance factor and a diagonal of the size CLIP features show. A single-Gaussian model has one
component; a mixture model has K components, K uniform in 1..`--components` (8: as many as a model
indexed with 8 prompts), each around its own concept (a broad model's samples span several), with
Dirichlet(1) weights. Queries are unit vectors near random concepts. The encoder is excluded: timings
start from the query feature.

- latency: `rank_candidates` (FAISS candidates over component means + exact rerank of the candidates'
  mixtures from the memory-mapped moments), text (moment-generating score) and image (log-density)
  queries, p50/p95 over `--queries` queries, cold (first pass: the candidates' moments come from disk) and
  warm (second pass: from the page cache);
- recall@10: the approximate top 10 against exact scoring of every model with the same score;
- baseline: the released Modelverse code's approach, a Python loop scoring every model in turn
  (single Gaussians only);
- build: seconds to write the index (arrays + FAISS), bytes on disk, peak RSS of this process.

    python benchmarks/search.py                    # 10^3 ... 10^6, single Gaussian and mixture
    python benchmarks/search.py --sizes 100000 --candidates 50 100 200 --threads 1
    python benchmarks/search.py --sizes 1000000 --dim 128 --rank 4   # 10^6 mixtures at d = 512 need ~80 GB
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from modelzoo.search.engine import QueryPart, default_pool, rank_candidates
from modelzoo.search.index import Fingerprint, MomentIndex, write_index
from modelzoo.search.moments import MixtureBatch, mixture_density_scores, mixture_text_scores

DIM = 512
"""CLIP ViT-B/32's feature size; `--dim` lowers it where the disk cannot hold 10^6 mixtures at 512."""
CONCEPTS = 2000
TAU = 100.0
CHUNK = 100_000
"""Components generated or scored per step (bounded temporaries at 10^6 models)."""
SAMPLES = 128
"""Samples behind each synthetic model, shared among its components by weight (as `zoo index` samples)."""


def synthetic_models(
    n: int, rank: int, max_components: int, directory: Path, dim: int = DIM, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """starts (n + 1), log weights (N), and memory-mapped component means, factors and diagonals."""
    rng = np.random.default_rng(seed)
    concepts = rng.normal(size=(CONCEPTS, dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    K = rng.integers(1, max_components + 1, n)
    starts = np.concatenate([[0], np.cumsum(K)])
    N = int(starts[-1])
    log_weights = np.empty(N)
    for k in range(1, max_components + 1):
        chosen = np.flatnonzero(k == K)
        w = rng.dirichlet(np.ones(k), len(chosen))
        log_weights[(starts[chosen][:, None] + np.arange(k)).ravel()] = np.log(w).ravel()
    means = np.lib.format.open_memmap(directory / "m.npy", "w+", np.float32, (N, dim))
    factors = np.lib.format.open_memmap(directory / "f.npy", "w+", np.float16, (N, dim, rank))
    diags = np.lib.format.open_memmap(directory / "d.npy", "w+", np.float32, (N, dim))
    for start in range(0, N, CHUNK):
        m = min(CHUNK, N - start)
        x = concepts[rng.integers(0, CONCEPTS, m)] + rng.normal(0, 0.6 / np.sqrt(dim), (m, dim)).astype(np.float32)
        means[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        factors[start : start + m] = (rng.standard_normal((m, dim, rank), np.float32) * (0.15 / np.sqrt(dim)))
        diags[start : start + m] = rng.uniform(0.2, 1.0, (m, dim)).astype(np.float32) * (0.05 / dim)
    return starts, log_weights, means, factors, diags


def queries(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    concepts = np.random.default_rng(seed).normal(size=(CONCEPTS, dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    q = concepts[rng.integers(0, CONCEPTS, n)] + rng.normal(0, 0.8 / np.sqrt(dim), (n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def exact_top(index: MomentIndex, qs: np.ndarray, kind: str, k: int = 10) -> list[np.ndarray]:
    """The exact top k positions for each query, every model scored, in one pass over the moments."""
    scores = np.empty((len(qs), len(index)))
    step = max(1, int(CHUNK / (len(index.means) / len(index))))
    for s in range(0, len(index), step):
        batch = index.moments(np.arange(s, min(s + step, len(index))))
        for i, q in enumerate(qs):
            scores[i, s : s + len(batch)] = _score(kind, batch, q)
    return [np.argsort(-row, kind="stable")[:k] for row in scores]


def _score(kind: str, batch: MixtureBatch, q: np.ndarray) -> np.ndarray:
    return mixture_text_scores(batch, q, TAU) if kind == "text" else mixture_density_scores(batch, q)


def modelverse_loop(index: MomentIndex, q: np.ndarray) -> int:
    """Score every single-Gaussian model in a Python loop, one model's moments at a time, as the released
    code does."""
    best, best_score = -1, -np.inf
    for i in range(len(index)):
        mu, factor, diag = index.means[i], index.factors[i].astype(np.float32), index.diags[i]
        projected = factor.T @ q
        score = TAU * float(mu @ q) + 0.5 * TAU**2 * float(projected @ projected + diag @ (q * q))
        if score > best_score:
            best, best_score = i, score
    return best


def percentile_ms(times: list[float], p: float) -> float:
    return round(float(np.percentile(times, p)) * 1000, 3)


def build(
    n: int, rank: int, max_components: int, dim: int, work: Path, seed: int = 0
) -> tuple[MomentIndex, dict[str, object]]:
    directory = work / f"n{n}-k{max_components}"
    directory.mkdir()
    starts, log_weights, means, factors, diags = synthetic_models(n, rank, max_components, directory, dim, seed)
    started = time.perf_counter()
    index = write_index(directory / "index", "bench", "images", Fingerprint(n, n, n), np.arange(1, n + 1), starts,
                        log_weights, means, factors, diags, np.exp(log_weights) * SAMPLES)
    build_s = time.perf_counter() - started
    del means, factors, diags
    for name in ("m.npy", "f.npy", "d.npy"):
        (directory / name).unlink()
    disk = sum(p.stat().st_size for p in (directory / "index").iterdir())
    return index, {
        "models": n, "dim": dim, "rank": rank, "summary": "gaussian" if max_components == 1 else "mixture",
        "max_components": max_components, "components": len(index.means), "faiss": index.kind,
        "build_s": round(build_s, 2), "index_bytes": disk,
    }


def measure(index: MomentIndex, qs: np.ndarray, pool: int, exact: dict[str, list[np.ndarray]]) -> dict[str, object]:
    """Latency of every query twice (cold, then warm), and recall@10 of the first len(exact[kind]) queries;
    `pool` 0 is the index's default pool."""
    pool = pool or default_pool(len(index.means))
    result: dict[str, object] = {"candidates": pool}
    for kind in ("text", "image"):
        cold: list[float] = []
        warm: list[float] = []
        for times in (cold, warm):  # first pass: candidates' moments read from disk; second: page cache
            for q in qs:
                t0 = time.perf_counter()
                ranking = rank_candidates(index, [QueryPart("q", q, kind)], pool, TAU)
                ranking.positions[ranking.order[:10]]
                times.append(time.perf_counter() - t0)
        recalls = []
        for q, top_exact in zip(qs, exact[kind], strict=False):
            ranking = rank_candidates(index, [QueryPart("q", q, kind)], pool, TAU)
            top = ranking.positions[ranking.order[:10]]
            recalls.append(len(set(top.tolist()) & set(top_exact.tolist())) / 10)
        result[kind] = {
            "p50_ms": percentile_ms(warm, 50), "p95_ms": percentile_ms(warm, 95),
            "cold_p50_ms": percentile_ms(cold, 50), "cold_p95_ms": percentile_ms(cold, 95),
            "recall_at_10": round(float(np.mean(recalls)), 4), "recall_queries": len(recalls),
        }
    return result


def run(n: int, args: argparse.Namespace, work: Path) -> list[dict[str, object]]:
    """Build every summary's index for n models, then measure them in turn for each candidate pool, so
    that both see the same machine load."""
    built = [build(n, args.rank, 1 if s == "gaussian" else args.components, args.dim, work, args.seed)
             for s in args.summaries]
    qs = queries(args.queries, args.seed, args.dim)
    recall_queries = min(args.queries, 20 if n <= 100_000 else 10)
    exact = [{kind: exact_top(index, qs[:recall_queries], kind) for kind in ("text", "image")} for index, _ in built]
    results = []
    for pool in args.candidates:
        for (index, info), top in zip(built, exact, strict=True):
            results.append({**info, **measure(index, qs, pool, top)})
    gaussian = next((index for index, info in built if info["summary"] == "gaussian"), None)
    loops = args.loop_queries if n <= 100_000 else min(args.loop_queries, 1)
    if gaussian is not None and loops:
        t0 = time.perf_counter()
        for q in qs[:loops]:
            modelverse_loop(gaussian, q)
        results.append({"models": n, "modelverse_loop_ms": round((time.perf_counter() - t0) / loops * 1000, 1)})
    for index, _ in built:
        shutil.rmtree(index.directory.parent, ignore_errors=True)
    results.append({"models": n, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--candidates", type=int, nargs="+", default=[0],
                        help="components reranked per query (versions are taken whole); 0: each index's "
                             "default pool (search.engine.default_pool)")
    parser.add_argument("--components", type=int, default=8, help="most components of a mixture model")
    parser.add_argument("--summaries", nargs="+", choices=("gaussian", "mixture"), default=["gaussian", "mixture"])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic models and queries")
    parser.add_argument("--loop-queries", type=int, default=3, help="queries timed for the Python loop (0: skip)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="zoo-search-bench-"))
    try:
        results = []
        for n in args.sizes:
            for row in run(n, args, work):
                results.append(row)
                print(json.dumps(row), flush=True)
        summary = {"benchmark": "search", "dim": args.dim, "threads": args.threads, "results": results}
        print(json.dumps(summary, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
