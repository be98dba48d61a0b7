"""Read-only queries over the whole registry: filtered listing, hash lookup, storage statistics and
related versions by shared tensor bytes. Each is one SQL query (plus a recursive CTE where needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.orm import Session

from modelzoo.registry.blobs import FACTORED
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import FindHit, ModelSummary, Related, StoreStats
from modelzoo.registry.refs import hex_prefix, resolve
from modelzoo.registry.schema import (
    Blob,
    BlobFactors,
    DerivedTensor,
    ManifestEntry,
    Model,
    Provenance,
    SourceFile,
    Tag,
    Version,
    VersionParent,
)
from modelzoo.registry.store import Registry

MIN_FIND_PREFIX = 6


@dataclass(frozen=True)
class ListFilter:
    family: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    since: datetime | None = None
    descendant_of: str | None = None


def parse_since(text: str | None) -> datetime | None:
    """A `since` filter as users type it: an ISO date or time, read as UTC when it names no zone."""
    if not text:
        return None
    try:
        since = datetime.fromisoformat(text)
    except ValueError:
        raise BadInput(f"invalid date {text[:40]!r}: use ISO format, e.g. 2026-11-25") from None
    return since if since.tzinfo is not None else since.replace(tzinfo=UTC)


def descendants_cte(version_id: int):  # type: ignore[no-untyped-def]
    """Every version reachable from `version_id` through parent edges, at any depth."""
    walk = select(VersionParent.child_id.label("id")).where(VersionParent.parent_id == version_id).cte(
        "descendants", recursive=True
    )
    return walk.union(select(VersionParent.child_id).where(VersionParent.parent_id == walk.c.id))


def list_models(registry: Registry, flt: ListFilter | None = None) -> list[ModelSummary]:
    flt = flt or ListFilter()
    with registry.db.read() as session:
        query = (
            select(Version.model_id, Version.number)
            .join(Model, Model.id == Version.model_id)
            .where(Version.status == "ready")
        )
        if flt.family:
            query = query.where(Model.family == flt.family)
        if flt.method:
            query = query.join(Provenance, Provenance.version_id == Version.id).where(Provenance.method == flt.method)
        if flt.since:
            query = query.where(Version.created_at >= flt.since)
        for key, value in flt.tags.items():
            query = query.where(exists().where(
                Tag.model_id == Version.model_id,
                or_(Tag.version_id.is_(None), Tag.version_id == Version.id),
                Tag.key == key,
                Tag.value == value,
            ))
        if flt.descendant_of:
            base = resolve(session, flt.descendant_of, include_deleted=True)
            walk = descendants_cte(base.id)
            query = query.where(Version.id.in_(select(walk.c.id)))
        matching: dict[int, list[int]] = {}
        for model_id, number in session.execute(query.order_by(Version.model_id, Version.number)):
            matching.setdefault(model_id, []).append(number)
        filtered = flt != ListFilter()
        return _summaries(session, matching, include_empty=not filtered)


def _summaries(session: Session, matching: dict[int, list[int]], include_empty: bool) -> list[ModelSummary]:
    counted = select(Version.model_id, func.max(Version.number).label("latest"), func.count().label("n")).where(
        Version.status == "ready"
    )
    if not include_empty:  # summarise only the models that matched, not every version in the registry
        counted = counted.where(Version.model_id.in_(list(matching)))
    latest = counted.group_by(Version.model_id).subquery()
    query = select(Model, latest.c.latest, latest.c.n).outerjoin(latest, latest.c.model_id == Model.id)
    if not include_empty:
        query = query.where(Model.id.in_(list(matching)))
    rows = session.execute(query.order_by(Model.name)).all()
    tags: dict[int, dict[str, str]] = {}
    tag_query = select(Tag).where(Tag.version_id.is_(None))
    if not include_empty:
        tag_query = tag_query.where(Tag.model_id.in_(list(matching)))
    for t in session.scalars(tag_query):
        tags.setdefault(t.model_id, {})[t.key] = t.value
    return [
        ModelSummary(m.name, m.family, m.description, latest_number, n or 0, tags.get(m.id, {}), m.created_at,
                     matching.get(m.id, []))
        for m, latest_number, n in rows
    ]


def find(registry: Registry, sha_prefix: str) -> list[FindHit]:
    """Every version holding a tensor or file whose hash starts with the prefix, or whose manifest does."""
    prefix = sha_prefix.lower()
    if len(prefix) < MIN_FIND_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise BadInput(f"{sha_prefix!r} is not a sha256 prefix of at least {MIN_FIND_PREFIX} hex digits")
    with registry.db.read() as session:
        blob_rows = session.execute(
            select(Blob.sha256, Blob.kind, ManifestEntry.name, Model.name, Version.number)
            .join(ManifestEntry, ManifestEntry.blob_sha256 == Blob.sha256)
            .join(Version, Version.id == ManifestEntry.version_id)
            .join(Model, Model.id == Version.model_id)
            .where(hex_prefix(Blob.sha256, prefix))
            .order_by(Model.name, Version.number, ManifestEntry.name)
        )
        hits = [FindHit(sha, kind, name, f"{model}@{number}") for sha, kind, name, model, number in blob_rows]
        manifest_rows = session.execute(
            select(Version.manifest_hash, Model.name, Version.number)
            .join(Model, Model.id == Version.model_id)
            .where(hex_prefix(Version.manifest_hash, prefix))
        )
        hits += [FindHit(sha, "manifest", "", f"{model}@{number}") for sha, model, number in manifest_rows]
        source_rows = session.execute(
            select(SourceFile.sha256, SourceFile.path, Model.name, Version.number)
            .join(Version, Version.id == SourceFile.version_id)
            .join(Model, Model.id == Version.model_id)
            .where(hex_prefix(SourceFile.sha256, prefix))
            .order_by(Model.name, Version.number, SourceFile.path)
        )
        hits += [FindHit(sha, "source file", path, f"{model}@{number}") for sha, path, model, number in source_rows]
        factor_rows = session.execute(
            select(BlobFactors.b_sha256, BlobFactors.a_sha256, ManifestEntry.name, Model.name, Version.number)
            .join(ManifestEntry, ManifestEntry.blob_sha256 == BlobFactors.sha256)
            .join(Version, Version.id == ManifestEntry.version_id)
            .join(Model, Model.id == Version.model_id)
            .where(or_(hex_prefix(BlobFactors.b_sha256, prefix), hex_prefix(BlobFactors.a_sha256, prefix)))
            .order_by(Model.name, Version.number, ManifestEntry.name)
        )
        for b, a, name, model, number in factor_rows:
            role, sha = ("B", b) if b.startswith(prefix) else ("A", a)
            hits.append(FindHit(sha, "factor", f"{name} ({role})", f"{model}@{number}"))
    return hits


def stats(registry: Registry) -> StoreStats:
    with registry.db.read() as session:
        blobs, stored = session.execute(select(func.count(), func.coalesce(func.sum(Blob.nbytes), 0))
                                        .where(Blob.kind != FACTORED)).one()
        versions, logical = session.execute(
            select(func.count(), func.coalesce(func.sum(Version.logical_bytes), 0)).where(Version.status == "ready")
        ).one()
        models = session.scalar(select(func.count()).select_from(Model)) or 0
        only_derived = (select(DerivedTensor.blob_sha256)
                        .except_(select(ManifestEntry.blob_sha256)).subquery())
        derived = session.scalar(select(func.coalesce(func.sum(Blob.nbytes), 0))
                                 .where(Blob.sha256.in_(select(only_derived.c[0])))) or 0
    root = registry.settings.blob_dir
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0
    return StoreStats(models, versions, blobs, int(stored), int(logical), disk, int(derived))


def related_versions(registry: Registry, blobs: dict[str, int], limit: int = 3) -> list[Related]:
    """The live versions sharing the most tensor bytes with a set of tensor blobs {sha256: nbytes}, e.g. an
    import being staged; `fraction` is the share of those blobs' bytes that each version also holds."""
    wanted = sorted(blobs)
    total = sum(blobs.values())
    holders: dict[int, set[str]] = {}
    with registry.db.read() as session:
        for i in range(0, len(wanted), 500):
            rows = session.execute(
                select(ManifestEntry.version_id, ManifestEntry.blob_sha256)
                .join(Version, and_(Version.id == ManifestEntry.version_id, Version.status == "ready"))
                .where(ManifestEntry.blob_sha256.in_(wanted[i : i + 500]), ManifestEntry.kind == "tensor")
            )
            for version_id, sha in rows:
                holders.setdefault(version_id, set()).add(sha)
        shared = {vid: sum(blobs[s] for s in shas) for vid, shas in holders.items()}
        best = sorted(shared.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        result = []
        for version_id, nbytes in best:
            v = session.get(Version, version_id)
            assert v is not None
            result.append(Related(f"{v.model.name}@{v.number}", nbytes, nbytes / total if total else 0.0))
        return result
