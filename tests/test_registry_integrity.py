"""Damage is found and named; schemas this code does not know are refused; crashes leave no half version."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import snapshot, zoo_cli

import modelzoo
from modelzoo.registry.errors import Corrupted


def test_flipped_byte_is_named_by_verify_with_the_versions_using_it(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "gpt2")
    w = "transformer.h.0.attn.c_attn.weight"
    zoo.commit(base.ref, {"transformer.ln_f.weight": torch.full((32,), 2.0)}, method="scale")
    blob = next(b for (k, n), b in zoo.registry.manifest(base.ref).items() if n == w)
    path = home / "blobs" / blob.location
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    result = zoo_cli(capsys, home, "verify", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    assert [d["sha256"] for d in report["damaged"]] == [blob.sha256]
    assert report["damaged"][0]["versions"] == ["gpt2@1", "gpt2@2"]
    assert zoo_cli(capsys, home, "verify").err.count(blob.sha256) == 1
    with pytest.raises(Corrupted, match="damaged"):
        zoo.tensors("gpt2@2")
    untouched = zoo.tensors("gpt2@2", names=["transformer.ln_f.weight"])
    assert torch.equal(untouched["transformer.ln_f.weight"], torch.full((32,), 2.0))


def test_missing_blob_file_is_damage(zoo, home, gpt2_dir, capsys):
    zoo.import_(gpt2_dir, "gpt2")
    victim = next(p for p in (home / "blobs").rglob("*.safetensors"))
    victim.unlink()
    result = zoo_cli(capsys, home, "verify", "--json")
    assert result.code == 1 and json.loads(result.out)["damaged"][0]["problem"] == "missing"


def test_newer_schema_is_refused_and_left_alone(zoo, home, capsys):
    with sqlite3.connect(home / "registry.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    before = snapshot(home)
    result = zoo_cli(capsys, home, "list")
    assert result.code == 2 and "newer than this modelzoo" in result.err
    assert snapshot(home) == before


def test_foreign_database_is_refused(home, capsys):
    home.mkdir(parents=True)
    with sqlite3.connect(home / "registry.db") as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    result = zoo_cli(capsys, home, "list")
    assert result.code == 2 and "not a modelzoo registry" in result.err


def test_old_schema_is_upgraded_on_open(home):
    from alembic import command
    from sqlalchemy import create_engine

    from modelzoo.registry.db import _alembic_config, head_revision

    engine = create_engine(f"sqlite:///{home / 'registry.db'}")
    home.mkdir(parents=True)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001")
    assert modelzoo.open(home).registry.db.current_revision() == head_revision()


WRITER = """
import sys, modelzoo
zoo = modelzoo.open(sys.argv[1])
if sys.argv[2] == "import":
    zoo.import_(sys.argv[3], "victim")
    sys.exit(0)
tensors = zoo.tensors("victim@1")
print("READY", flush=True)
for k in range(1, 1000):  # commit until killed; every commit rewrites every tensor
    zoo.commit("victim@1", {n: t * (1 + k / 1000) for n, t in tensors.items()}, method="scale")
print("DONE", flush=True)
"""


def test_killed_writers_leave_no_half_version_and_retry_succeeds(tmp_path):
    """SIGKILL a committing process at 20 random moments: the registry always verifies and shows only
    whole versions, numbered without gaps, and the next commit succeeds."""
    from safetensors import safe_open
    from tiny_models import save_tiny_gpt2

    model_dir = save_tiny_gpt2(tmp_path / "model", n_layer=4, n_embd=128, vocab_size=2048)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        expected_tensors = len(list(f.keys()))
    home = tmp_path / "zoo"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(home), "import", str(model_dir)], env=env, check=True)
    rng = random.Random(0)
    kills = 0
    for _trial in range(20):
        proc = subprocess.Popen([sys.executable, str(script), str(home), "commit"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().startswith(b"READY")
        time.sleep(rng.uniform(0.02, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        kills += b"DONE" not in out
        zoo = modelzoo.open(home)
        assert zoo.verify().ok
        versions = zoo.versions("victim")
        assert [v.number for v in versions] == list(range(1, len(versions) + 1))
        for version in versions:
            assert len(zoo.tensors(version.ref)) == version.tensor_count == expected_tensors
    assert kills == 20
    zoo = modelzoo.open(home)
    retried = zoo.commit("victim@1", {n: t * 3.0 for n, t in zoo.tensors("victim@1").items()}, method="scale")
    assert zoo.verify(retried.ref).ok
    zoo.gc(grace_s=0)
    assert zoo.verify().ok
    leftovers = [p for p in (home / "blobs").rglob("*") if p.is_file() and p.name.startswith(".tmp-")]
    assert leftovers == []


def test_failed_staging_leaves_no_blob_behind(zoo, home, gpt2_dir, tmp_path):
    from safetensors.torch import save_file

    zoo.import_(gpt2_dir, "gpt2")
    before = snapshot(home)
    weights = tmp_path / "late-nan.safetensors"
    save_file({"a": torch.randn(4096), "b": torch.randn(4096), "z": torch.tensor([float("inf")])}, weights)
    (tmp_path / "late-nan.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(modelzoo.BadInput):
        zoo.import_(weights, "nan")
    assert snapshot(home) == before


def test_export_of_a_damaged_version_fails_and_leaves_no_folder(zoo, home, gpt2_dir, tmp_path):
    zoo.import_(gpt2_dir, "gpt2")
    victim = max((p for p in (home / "blobs").rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(Corrupted):
        zoo.export("gpt2@1", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # no export, no partial folder


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_derived_tensors_are_kept_replaced_and_shared_through_the_database(home, backend, request):
    """A second put of the same key replaces the first (upsert), and another registry handle reads it."""
    from modelzoo.registry.derived import DerivedTensors

    url = request.getfixturevalue("pg_database") if backend == "postgresql" else None
    zoo = modelzoo.open(home, url) if url else modelzoo.open(home)
    key = {"model": "m" * 64, "module": "layer.1", "samples": 8}
    derived = DerivedTensors(zoo.registry)
    assert derived.get("memit-stats", key) is None
    derived.put("memit-stats", key, torch.eye(3), {"count": 8})
    derived.put("memit-stats", key, 2 * torch.eye(3), {"count": 9})
    other = DerivedTensors((modelzoo.open(home, url) if url else modelzoo.open(home)).registry)
    hit = other.get("memit-stats", key)
    assert hit is not None and torch.equal(hit.tensor, 2 * torch.eye(3)) and hit.meta == {"count": 9}
    assert other.get("memit-stats", {**key, "samples": 9}) is None
    report = zoo.gc(grace_s=0)
    assert report.blobs_removed == 1  # the replaced eye(3); the current value is kept
    assert zoo.verify().blobs_checked == 1
    assert zoo.stats().derived_bytes == 3 * 3 * 4


class _ChangesOnSecondRead(dict):
    """Changed tensors whose content differs the second time they are staged (a source edited under a
    running commit), so a restaging stores other blobs than the first staging did."""

    def __init__(self, name: str, first: torch.Tensor, second: torch.Tensor):
        super().__init__({name: first})
        self._second = {name: second}
        self._reads = 0

    def items(self):  # type: ignore[override]
        self._reads += 1
        return super().items() if self._reads == 1 else self._second.items()


def test_a_restaged_commit_leaves_no_blob_of_its_first_staging_behind(zoo, gpt2_dir, monkeypatch):
    from modelzoo.registry import store

    base = zoo.import_(gpt2_dir, "gpt2")
    claim = store.Registry.claim_blobs
    calls = []

    def vanish_once(self, session, blobs):  # as if a gc removed a blob between staging and the commit
        calls.append(1)
        if len(calls) == 1:
            raise store._BlobVanished("simulated")
        return claim(self, session, blobs)

    monkeypatch.setattr(store.Registry, "claim_blobs", vanish_once)
    changed = _ChangesOnSecondRead("transformer.ln_f.weight", torch.full((32,), 2.0), torch.full((32,), 3.0))
    child = zoo.commit(base.ref, changed, method="scale")
    assert torch.equal(zoo.tensors(child.ref)["transformer.ln_f.weight"], torch.full((32,), 3.0))
    report = zoo.gc(grace_s=0)
    assert report.stray_files_removed == 0 and report.blobs_removed == 0
