"""`verify` (recompute every blob's hash) and `gc` (remove what no version, analysis or derived tensor
references)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select, text, update

from modelzoo.registry.analyses import analyses_using
from modelzoo.registry.blobs import FACTORED, TEMP_PREFIX, blob_key
from modelzoo.registry.errors import Corrupted
from modelzoo.registry.factors import made_from, with_parts
from modelzoo.registry.paths import shown
from modelzoo.registry.records import DamagedBlob, GcReport, VerifyReport
from modelzoo.registry.refs import resolve
from modelzoo.registry.schema import (
    Analysis,
    AnalysisTensor,
    Blob,
    BlobFactors,
    DerivedTensor,
    Embedding,
    ManifestEntry,
    Model,
    Version,
)
from modelzoo.registry.store import GC_LOCK_KEY, Registry

DEFAULT_GRACE_S = 3600.0


def _referenced() -> Any:
    """The blobs something keeps: a version's manifest, an analysis or a derived tensor, and the blobs
    that the factored tensors among them are made of."""
    return with_parts(select(ManifestEntry.blob_sha256).union(select(DerivedTensor.blob_sha256),
                                                              select(AnalysisTensor.blob_sha256)))


def verify(registry: Registry, ref: str | None = None) -> VerifyReport:
    """Check the blobs of one version and its analyses (or of every version, analysis and derived tensor)
    and name each version or analysis a damaged blob affects. A damaged derived tensor is harmless (it is
    recomputed when next needed)."""
    with registry.db.read() as session:
        if ref is not None:
            version_id = resolve(session, ref, include_deleted=True).id
            used: Any = with_parts(select(ManifestEntry.blob_sha256).where(ManifestEntry.version_id == version_id)
                                   .union(select(AnalysisTensor.blob_sha256)
                                          .join(Analysis, Analysis.id == AnalysisTensor.analysis_id)
                                          .where(Analysis.version_id == version_id)))
        else:
            used = _referenced()
        blobs = session.scalars(select(Blob).where(Blob.sha256.in_(used)).order_by(Blob.sha256)).all()
    damaged: list[DamagedBlob] = []
    for blob in blobs:
        problem = _misplaced(blob) or _content_problem(registry, blob)
        if problem is not None:
            damaged.append(DamagedBlob(blob.sha256, problem, versions_using(registry, blob.sha256),
                                       derived_using(registry, blob.sha256), analyses_using(registry, blob.sha256)))
    return VerifyReport(len(blobs), sum(b.nbytes for b in blobs if b.kind != FACTORED), damaged)


def _content_problem(registry: Registry, blob: Blob) -> str | None:
    """A blob file's hash mismatch; for a factored tensor, a missing factors row (its B, A and base are
    checked as blobs of their own)."""
    if blob.kind != FACTORED:
        return registry.blobs.check(blob.sha256, blob.kind)
    with registry.db.read() as session:
        return None if session.get(BlobFactors, blob.sha256) is not None else "a factored tensor without its factors"


def _misplaced(blob: Blob) -> str | None:
    """A row whose location is not where its hash puts the blob: someone edited the database. The file is
    read (and gc deletes) only where the hash says, so such a row names no other file."""
    if blob.kind == FACTORED:
        return None if blob.location == "" else f"a factored tensor's row names a file {shown(blob.location)[:120]!r}"
    try:
        expected = blob_key(blob.sha256, blob.kind)
    except Corrupted as e:
        return str(e)
    if blob.location == expected:
        return None
    return f"its row names location {shown(blob.location)[:120]!r}, not {expected}"


def versions_using(registry: Registry, sha256: str) -> list[str]:
    with registry.db.read() as session:
        rows = session.execute(
            select(Model.name, Version.number)
            .join(Version, Version.model_id == Model.id)
            .join(ManifestEntry, ManifestEntry.version_id == Version.id)
            .where(ManifestEntry.blob_sha256.in_(made_from(sha256)))
            .distinct()
            .order_by(Model.name, Version.number)
        )
        return [f"{name}@{number}" for name, number in rows]


def derived_using(registry: Registry, sha256: str) -> list[str]:
    with registry.db.read() as session:
        kinds = session.scalars(select(DerivedTensor.kind).where(DerivedTensor.blob_sha256 == sha256).distinct())
        return sorted(kinds)


def gc(registry: Registry, purge_deleted: bool = False, grace_s: float = DEFAULT_GRACE_S,
       drop_derived: bool = False) -> GcReport:
    """Remove unreferenced blobs, and files no blob row knows that are older than `grace_s`.

    Derived tensors (editor caches) are kept unless `drop_derived`, or, with `purge_deleted`, once every
    version they were computed from is purged; dropped, they are recomputed on next use. Analyses are
    results and stay until their version is purged.

    Files are deleted inside the write transaction, so a commit (which re-checks its blobs inside its own
    transaction) never references a file that gc removed. The grace period protects blobs that an import
    in progress has written but not yet committed.
    """
    purged = analyses_dropped = 0
    with registry.db.write() as session:
        if not registry.db.is_sqlite:
            session.execute(text(f"SELECT pg_advisory_xact_lock({GC_LOCK_KEY})"))
        if purge_deleted:
            deleted = select(Version.id).where(Version.status == "deleted")
            session.execute(delete(ManifestEntry).where(ManifestEntry.version_id.in_(deleted)))
            session.execute(delete(Embedding).where(Embedding.version_id.in_(deleted)))
            of_deleted = select(Analysis.id).where(Analysis.version_id.in_(deleted))
            session.execute(delete(AnalysisTensor).where(AnalysisTensor.analysis_id.in_(of_deleted)))
            analyses_dropped = session.execute(delete(Analysis).where(Analysis.version_id.in_(deleted))).rowcount
            purge = update(Version).where(Version.status == "deleted").values(status="purged")
            purged = session.execute(purge).rowcount
        if drop_derived:
            dropped = session.execute(delete(DerivedTensor)).rowcount
        elif purge_deleted:  # values computed from versions that are all purged now
            live = select(Version.manifest_hash).where(Version.status != "purged")
            dropped = session.execute(delete(DerivedTensor).where(
                DerivedTensor.depends_on.is_not(None), DerivedTensor.depends_on.not_in(live))).rowcount
        else:
            dropped = 0
        referenced = _referenced()
        orphans = session.execute(select(Blob.sha256, Blob.kind, Blob.nbytes).where(
            Blob.sha256.not_in(referenced))).all()
        session.execute(delete(BlobFactors).where(BlobFactors.sha256.not_in(referenced)))
        session.execute(delete(Blob).where(Blob.sha256.not_in(referenced)))
        registry.blobs.delete(key for key in (_key_or_none(sha, kind) for sha, kind, _ in orphans) if key)
        known = {_key_or_none(sha, kind) for sha, kind in session.execute(select(Blob.sha256, Blob.kind))}
        stray = [
            key for key in registry.blobs.backend.keys(older_than_s=grace_s)
            if key not in known or key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX)
        ]
        registry.blobs.delete(stray)
    return GcReport(len(orphans), sum(n for _, kind, n in orphans if kind != FACTORED), len(stray), purged, dropped,
                    analyses_dropped)


def _key_or_none(sha256: str, kind: str) -> str | None:
    """A row's blob key, or None for a row that is no blob's (its row goes; no file is touched for it)."""
    try:
        return blob_key(sha256, kind)
    except Corrupted:
        return None
