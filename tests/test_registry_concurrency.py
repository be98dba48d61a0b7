"""Four processes committing at once: version numbers 1..40 with no gap, duplicate or lock failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modelzoo

WRITER = """
import sys, torch, modelzoo
home, url, worker = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
zoo = modelzoo.open(home, url)
for i in range(10):
    changed = {"transformer.ln_f.weight": torch.full((32,), float(worker * 100 + i + 2))}
    zoo.commit("base@1", changed, method="concurrent", params={"worker": worker, "i": i}, name="shared")
"""


def _run_writers(tmp_path: Path, home: Path, url: str | None, gpt2_dir: Path) -> modelzoo.Zoo:
    zoo = modelzoo.open(home, url)
    zoo.import_(gpt2_dir, "base")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), str(home), url or "", str(w)], env=env,
                         stderr=subprocess.PIPE, text=True)
        for w in range(4)
    ]
    failures = [p.stderr.read() for p in procs if p.wait() != 0]  # type: ignore[union-attr]
    assert failures == [], failures[0][-2000:]
    return zoo


def _check(zoo: modelzoo.Zoo) -> None:
    versions = zoo.versions("shared")
    assert sorted(v.number for v in versions) == list(range(1, 41))
    written = sorted((v.params["worker"], v.params["i"]) for v in versions)
    assert written == [(w, i) for w in range(4) for i in range(10)]
    for v in versions:
        value = zoo.tensors(v.ref, ["transformer.ln_f.weight"])["transformer.ln_f.weight"]
        assert torch.equal(value, torch.full((32,), float(v.params["worker"] * 100 + v.params["i"] + 2)))
    assert zoo.verify().ok


def test_four_processes_commit_to_one_sqlite_registry(tmp_path, home, gpt2_dir):
    _check(_run_writers(tmp_path, home, None, gpt2_dir))


@pytest.mark.postgres
def test_four_processes_commit_to_one_postgres_registry(tmp_path, home, gpt2_dir, pg_database):
    _check(_run_writers(tmp_path, home, pg_database, gpt2_dir))


@pytest.mark.postgres
def test_postgres_registry_round_trip_and_lineage(tmp_path, home, gpt2_dir, pg_database):
    zoo = modelzoo.open(home, pg_database)
    base = zoo.import_(gpt2_dir, "gpt2")
    w = "transformer.ln_f.weight"
    child = zoo.commit(base.ref, {w: zoo.tensors(base.ref)[w] * 2}, method="scale")
    assert [a.ref for a in zoo.lineage(child.ref).ancestors] == [base.ref]
    assert zoo.diff(base.ref, child.ref).changed[0].tensor == w
    zoo.set_alias(child.ref, "prod")
    assert zoo.get("gpt2@prod").number == 2
    zoo.delete(child.ref)
    assert zoo.gc(purge_deleted=True, grace_s=0).blobs_removed == 1
    assert zoo.verify().ok
