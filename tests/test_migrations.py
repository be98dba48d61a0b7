"""Every schema a released modelzoo could have left behind opens, upgrades to exactly the models' schema
and keeps its rows, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext

import modelzoo
from modelzoo.registry.blobs import BlobStore, LocalDirectoryBackend, StoredBlob
from modelzoo.registry.db import MIGRATIONS, head_revision, make_engine
from modelzoo.registry.derived import DerivedTensors, key_hash
from modelzoo.registry.schema import Base, Embedding, utcnow
from modelzoo.registry.store import manifest_hash

# sha256 of each revision script as released: a released script is never edited, or registries that say
# they are at that revision would hold different schemas. A change to the schema is a new revision.
RELEASED = {
    "0001_initial_schema.py": "bccc6f98b67d6f75b0680828fb69ec1e463a56d81eeb40424ef3762f25980e97",
    "0002_embeddings.py": "c9039932addda005a65de46788ac01f3c5b0d231994673e40fb7007663cf684d",
    "0003_derived_tensors.py": "f13f359aa12c4031de60476f08b78fa856108f59fc4abd4d0ca646cebf06aa43",
    "0004_derived_depends_on.py": "1f513465a3c5b1a069e57b5c44d90cbd623dc35253f05c433bf27147f61c38f7",
    "0005_source_files.py": "3b9246535aca7a0999845146829a50143efe86848f66b550f6e4aedafb3e57e1",
    "0006_analyses.py": "fd84346327e843b46ca448d4711244bcd7f20b5310129a55e166decc83c5b568",
    "0007_factored_tensors.py": "0cca9d59603d13bb4e9e682409764b99adcc6e6a03fac8bc4018d3ac20ba54b0",
    "0008_embedding_mixtures.py": "314c5a334dbc0182fc4573906b74aeaad6e84cf10a39839319a9fd461e2dedae",
}
# A revision, or "0003-edited": the schema that 0003 made while its script also created `depends_on`.
STATES = ["0001", "0002", "0003", "0003-edited", "0004", "0005", "0006", "0007"]
KEPT = torch.arange(6, dtype=torch.float32).reshape(2, 3)
DELETED = torch.ones(4)
DERIVED = torch.eye(3)
DERIVED_KEY = {"layer": 1}


def _config(conn: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _create_edited_0003(conn: sa.Connection) -> None:
    op = Operations(MigrationContext.configure(conn))
    op.create_table(
        "derived_tensors",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("key", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("depends_on", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["blob_sha256"], ["blobs.sha256"]),
        sa.PrimaryKeyConstraint("kind", "key_hash"),
    )
    op.create_index("ix_derived_tensors_blob_sha256", "derived_tensors", ["blob_sha256"])
    op.create_index("ix_derived_tensors_depends_on", "derived_tensors", ["depends_on"])


def _seed(conn: sa.Connection, blobs: BlobStore) -> dict[str, StoredBlob]:
    """A model with a live version and a deleted one, a tag, and, where the tables exist, an embedding
    and a derived tensor: rows written as the code of that revision wrote them."""
    meta = sa.MetaData()
    meta.reflect(conn)
    t = meta.tables
    stored = {name: blobs.put_tensor(tensor) for name, tensor in
              {"kept": KEPT, "deleted": DELETED, "derived": DERIVED}.items()}
    blobs.sync()
    conn.execute(t["blobs"].insert(), [
        dict(sha256=b.sha256, kind=b.kind, dtype=b.dtype, shape=list(b.shape or ()), nbytes=b.nbytes,
             location=b.location, created_at=utcnow())
        for b in stored.values()])
    conn.execute(t["models"].insert(), dict(id=1, name="m", family="gan", description="", created_at=utcnow(),
                                            next_number=3))
    for number, name, status in ((1, "kept", "ready"), (2, "deleted", "deleted")):
        sha = stored[name].sha256
        conn.execute(t["versions"].insert(), dict(
            id=number, model_id=1, number=number, config={}, manifest_hash=manifest_hash({("tensor", "w"): sha}),
            status=status, logical_bytes=stored[name].nbytes, added_bytes=stored[name].nbytes, created_at=utcnow()))
        conn.execute(t["manifest_entries"].insert(), dict(version_id=number, kind="tensor", name="w", blob_sha256=sha))
        conn.execute(t["provenance"].insert(), dict(
            version_id=number, method="import", params={}, metrics={}, source={}, package_version="0.1.0",
            duration_s=0.0))
    conn.execute(t["tags"].insert(), dict(model_id=1, version_id=1, key="stage", value="seeded"))
    if "embeddings" in t:
        conn.execute(t["embeddings"].insert(), dict(
            version_id=1, encoder_id="e", encoder_hash="0" * 64, spec_hash="1" * 64, sample_spec={}, count=1, dim=1,
            rank=0, mean=b"\0" * 4, factor=b"", diag=b"\0" * 4, thumbnail="", seconds=0.0, created_at=utcnow()))
    if "derived_tensors" in t:
        conn.execute(t["derived_tensors"].insert(), dict(
            kind="memit_cov", key_hash=key_hash("memit_cov", DERIVED_KEY), key=DERIVED_KEY,
            blob_sha256=stored["derived"].sha256, meta={}, created_at=utcnow()))
    return stored


def _build(home: Path, url: str, state: str) -> dict[str, StoredBlob]:
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            config = _config(conn)
            if state == "0003-edited":
                command.upgrade(config, "0002")
                _create_edited_0003(conn)
                command.stamp(config, "0003")
            else:
                command.upgrade(config, state)
            return _seed(conn, BlobStore(LocalDirectoryBackend(home / "blobs")))
    finally:
        engine.dispose()


def _schema_diff(zoo: modelzoo.Zoo) -> list[object]:
    with zoo.registry.db.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def _assert_opens_at_head_with_its_rows(home: Path, url: str) -> modelzoo.Zoo:
    zoo = modelzoo.open(home, url)
    assert zoo.registry.db.current_revision() == head_revision()
    assert _schema_diff(zoo) == []
    assert torch.equal(zoo.tensors("m@1")["w"], KEPT)
    assert zoo.get("m@1").tags == {"stage": "seeded"}
    return zoo


def _check_upgrade(home: Path, url: str, state: str) -> None:
    _build(home, url, state)
    zoo = _assert_opens_at_head_with_its_rows(home, url)
    if state != "0001":  # an embedding from before 0008 reads as one Gaussian of the images of its GAN
        with zoo.registry.db.read() as session:
            assert session.execute(sa.select(Embedding.components, Embedding.weights, Embedding.modality)).one() == (
                1, None, "images")
    if state.startswith("0003"):
        derived = DerivedTensors(zoo.registry).get("memit_cov", DERIVED_KEY)
        assert derived is not None and torch.equal(derived.tensor, DERIVED)


def _sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / 'registry.db'}"


def test_released_revision_scripts_are_unchanged():
    scripts = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (MIGRATIONS / "versions").glob("0*.py")}
    assert scripts == RELEASED


@pytest.mark.parametrize("state", STATES)
def test_sqlite_registry_at_each_revision_upgrades_to_the_models_schema(home, state):
    _check_upgrade(home, _sqlite_url(home), state)


@pytest.mark.postgres
@pytest.mark.parametrize("state", STATES)
def test_postgres_registry_at_each_revision_upgrades_to_the_models_schema(home, pg_database, state):
    _check_upgrade(home, pg_database, state)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_new_registry_has_the_models_schema(home, request, backend):
    url = _sqlite_url(home) if backend == "sqlite" else request.getfixturevalue("pg_database")
    assert _schema_diff(modelzoo.open(home, url)) == []


def test_downgrade_to_shipped_0003_and_back_keeps_the_rows(home):
    url = _sqlite_url(home)
    _build(home, url, "0003")
    zoo = modelzoo.open(home, url)
    with zoo.registry.db.engine.begin() as conn:
        command.downgrade(_config(conn), "0003")
        assert "depends_on" not in {c["name"] for c in sa.inspect(conn).get_columns("derived_tensors")}
    _assert_opens_at_head_with_its_rows(home, url)


def test_gc_purge_works_after_upgrading_a_shipped_0003_registry(home):
    url = _sqlite_url(home)
    stored = _build(home, url, "0003")
    zoo = modelzoo.open(home, url)

    report = zoo.gc(purge_deleted=True, grace_s=0)

    assert (report.versions_purged, report.derived_dropped) == (1, 0)
    assert not (home / "blobs" / stored["deleted"].location).exists()
    assert torch.equal(zoo.tensors("m@1")["w"], KEPT)
    derived = DerivedTensors(zoo.registry).get("memit_cov", DERIVED_KEY)
    assert derived is not None and torch.equal(derived.tensor, DERIVED)
