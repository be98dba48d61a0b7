"""Query latency at scale: 10^4 and 10^5 synthetic versions in SQLite and PostgreSQL; p50/p95 of a
filtered `list`, of all descendants of a base with 10^3 descendants, and of `find` by hash prefix.
Prints JSON.  python benchmarks/registry_query.py [--sizes 10000 100000] [--no-postgres]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_server import pg_bin, postgres_server  # noqa: E402

import modelzoo  # noqa: E402
from modelzoo.registry import lineage as lineage_queries  # noqa: E402
from modelzoo.registry.queries import ListFilter  # noqa: E402
from modelzoo.registry.schema import Blob, ManifestEntry, Model, Provenance, Tag, Version, VersionParent  # noqa: E402

VERSIONS_PER_MODEL = 100
TENSORS_PER_VERSION = 4
DESCENDANTS = 1000
METHODS = ["import", "uce", "esd", "memit", "warp"]
FAMILIES = ["diffusion", "lm", "gan"]


def sha(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def populate(zoo: modelzoo.Zoo, n_versions: int) -> dict[str, str]:
    """Bulk-insert models, versions, provenance, tags, manifests; version 1 of model 0 gets 10^3 descendants."""
    n_models = n_versions // VERSIONS_PER_MODEL
    models, versions, provenance, tags, parents, blobs, entries = [], [], [], [], [], [], []
    vid = 0
    for m in range(n_models):
        models.append({"id": m + 1, "name": f"model-{m}", "family": FAMILIES[m % 3], "description": "",
                       "next_number": VERSIONS_PER_MODEL + 1})
        tags.append({"model_id": m + 1, "version_id": None, "key": "team", "value": f"team-{m % 20}"})
        for n in range(1, VERSIONS_PER_MODEL + 1):
            vid += 1
            versions.append({"id": vid, "model_id": m + 1, "number": n, "config": {}, "manifest_hash": sha("m", vid),
                             "status": "ready", "logical_bytes": 4096, "added_bytes": 1024})
            provenance.append({"version_id": vid, "method": METHODS[vid % 5], "params": {}, "metrics": {},
                               "source": {}, "package_version": "bench", "duration_s": 0.0})
            for t in range(TENSORS_PER_VERSION):
                # every version shares three tensors with its predecessor and adds one new blob
                blob = sha("t", m, t) if t < TENSORS_PER_VERSION - 1 else sha("t", vid)
                entries.append({"version_id": vid, "kind": "tensor", "name": f"w{t}", "blob_sha256": blob})
    seen: set[str] = set()
    for e in entries:
        if e["blob_sha256"] not in seen:
            seen.add(e["blob_sha256"])
            blobs.append({"sha256": e["blob_sha256"], "kind": "tensor", "dtype": "F32", "shape": [256],
                          "nbytes": 1024, "location": "x"})
    # Parent edges: each version's predecessor in its model; the base (id 1) gets 10^3 descendants spread
    # over the first versions of other models, ten direct children deep in chains.
    for v in versions:
        if v["number"] > 1:
            parents.append({"child_id": v["id"], "parent_id": v["id"] - 1, "relation": "edit", "evidence": {}})
    firsts = [v["id"] for v in versions if v["number"] == 1][1:]
    tree = firsts[: DESCENDANTS // VERSIONS_PER_MODEL]
    for child in tree:
        parents.append({"child_id": child, "parent_id": 1, "relation": "finetune", "evidence": {}})
    with zoo.registry.db.write() as session:
        for table, rows in [(Model, models), (Blob, blobs), (Version, versions), (Provenance, provenance),
                            (Tag, tags), (ManifestEntry, entries), (VersionParent, parents)]:
            for i in range(0, len(rows), 20_000):
                session.execute(insert(table), rows[i : i + 20_000])
    with zoo.registry.db.engine.connect() as conn:  # planner statistics, as autovacuum / PRAGMA optimize keep
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    return {"base": "model-0@1", "blob": sha("t", n_versions // 2)}


def latency(fn: Callable[[], object], repeats: int = 30) -> dict[str, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * len(times)) - 1], 2)}


def measure(zoo: modelzoo.Zoo, n: int) -> dict[str, object]:
    started = time.perf_counter()
    keys = populate(zoo, n)
    build = time.perf_counter() - started
    flt = ListFilter(family="lm", tags={"team": "team-1"}, method="memit")
    descendants = lineage_queries.lineage(zoo.registry, keys["base"]).descendants
    assert len(descendants) >= DESCENDANTS, len(descendants)
    return {
        "versions": n,
        "populate_s": round(build, 1),
        "filtered_list": latency(lambda: zoo.list(flt)),
        "descendants_of_base": {"count": len(descendants),
                                **latency(lambda: lineage_queries.lineage(zoo.registry, keys["base"]))},
        "list_descendant_of": latency(lambda: zoo.list(ListFilter(descendant_of=keys["base"]))),
        "find_prefix": latency(lambda: zoo.find(keys["blob"][:12])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    results = []
    backends = ["sqlite"] + ([] if args.no_postgres or pg_bin() is None else ["postgresql"])
    for backend in backends:
        server = postgres_server(pg_bin()) if backend == "postgresql" else nullcontext(None)  # type: ignore[arg-type]
        with server as url:
            for n in args.sizes:
                home = Path(tempfile.mkdtemp(prefix="zoo-q-"))
                db_url = None
                if url:
                    import psycopg

                    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
                        conn.execute(f"CREATE DATABASE bench_{n}")
                    db_url = url.rsplit("/", 1)[0] + f"/bench_{n}"
                try:
                    zoo = modelzoo.open(home, db_url)
                    results.append({"backend": backend, **measure(zoo, n)})
                    zoo.registry.db.engine.dispose()
                finally:
                    shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
