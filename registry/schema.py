"""The registry's tables (SQLAlchemy 2.0 typed ORM). Every change here ships with an Alembic migration.

The database is the source of truth: blob files and search indexes can be verified or rebuilt from it.
A version becomes visible in the same transaction that writes its manifest, so no reader ever sees
half a version.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    family: Mapped[str] = mapped_column(String(32), index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Version numbers are handed out from this counter under a row lock, so they are never reused.
    next_number: Mapped[int] = mapped_column(default=1)

    versions: Mapped[list[Version]] = relationship(back_populates="model", order_by="Version.number")


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    number: Mapped[int]
    # What the family adapter needs to rebuild the architecture (format, components, weight file names).
    config: Mapped[dict[str, Any]]
    manifest_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="ready", index=True)
    logical_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    added_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    model: Mapped[Model] = relationship(back_populates="versions")
    provenance: Mapped[Provenance] = relationship(back_populates="version", uselist=False)


class VersionParent(Base):
    """A typed lineage edge; merges and compositions have several parents."""

    __tablename__ = "version_parents"

    child_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True, index=True)
    relation: Mapped[str] = mapped_column(String(32))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Blob(Base):
    """One tensor or one file, addressed by the sha256 of its content (dtype and shape included)."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # "tensor" | "file"
    dtype: Mapped[str | None] = mapped_column(String(16))
    shape: Mapped[list[Any] | None]
    nbytes: Mapped[int] = mapped_column(BigInteger)
    location: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BlobFactors(Base):
    """A factored tensor (`registry/factors.py`): blob `sha256`, of kind "factored" and with no file of its
    own, is the tensor of blob `base_sha256` plus `scale` * B @ A. `depth` counts the factored links down
    to a dense blob (1 when the base is dense)."""

    __tablename__ = "blob_factors"

    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), primary_key=True)
    base_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    b_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    a_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    scale: Mapped[float] = mapped_column(Float)
    depth: Mapped[int]


class ManifestEntry(Base):
    """(version, tensor name or file path) -> blob. A child that changes k tensors adds k blobs."""

    __tablename__ = "manifest_entries"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)


class SourceFile(Base):
    """A file a version was imported from, by its own sha256 (what `sha256sum` and the Hub show for it),
    so `zoo find` answers for the file a user holds, not only for the tensors inside it."""

    __tablename__ = "source_files"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(512), primary_key=True)  # relative to the imported folder
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    nbytes: Mapped[int] = mapped_column(BigInteger)


class Provenance(Base):
    __tablename__ = "provenance"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), primary_key=True)
    method: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[dict[str, Any]] = mapped_column(default=dict)
    package_version: Mapped[str] = mapped_column(String(32))
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)

    version: Mapped[Version] = relationship(back_populates="provenance")


class Tag(Base):
    """A key=value label on a model (version_id NULL) or on one version."""

    __tablename__ = "tags"
    __table_args__ = (
        UniqueConstraint("model_id", "version_id", "key"),
        Index("ix_tags_key_value", "key", "value"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"), index=True)
    key: Mapped[str] = mapped_column(String(128))
    value: Mapped[str] = mapped_column(String(512))


class Alias(Base):
    """A movable name for one version of one model (`sd@prod`)."""

    __tablename__ = "aliases"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))


class AuditEvent(Base):
    """Append-only history of alias moves and tag changes: rows are inserted, never updated."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_subject", "model_id", "kind", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # "alias" | "tag"
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[str | None] = mapped_column(String(512))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Embedding(Base):
    """A version's sample moments under one encoder: what content-based search scores.

    `encoder_hash` pins the exact encoder weights (moments from different encoders are never compared);
    `spec_hash` pins what was sampled (`sample_spec`: prompts, seeds, count); `modality` says whether
    images or texts were embedded. The moments are a mixture of `components` Gaussians: float32 weights
    (NULL for one component), float32 (components, dim) means and diagonals and a float16
    (components, dim, rank) covariance factor, little-endian bytes. Search indexes on disk are caches of
    these rows and are rebuilt from them.
    """

    __tablename__ = "embeddings"
    __table_args__ = (UniqueConstraint("version_id", "encoder_hash", "spec_hash"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    encoder_id: Mapped[str] = mapped_column(String(256))
    encoder_hash: Mapped[str] = mapped_column(String(64), index=True)
    spec_hash: Mapped[str] = mapped_column(String(64))
    sample_spec: Mapped[dict[str, Any]]
    count: Mapped[int]
    dim: Mapped[int]
    rank: Mapped[int]
    mean: Mapped[bytes] = mapped_column(LargeBinary)
    factor: Mapped[bytes] = mapped_column(LargeBinary)
    diag: Mapped[bytes] = mapped_column(LargeBinary)
    components: Mapped[int] = mapped_column(default=1, server_default="1")
    weights: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    modality: Mapped[str] = mapped_column(String(16), default="images", server_default="images", index=True)
    thumbnail: Mapped[str] = mapped_column(String(512), default="")
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DerivedTensor(Base):
    """A tensor computed from a version and reused across edits (`registry/derived.py`): MEMIT's key
    covariance per layer, AlphaEdit's accumulated keys. `key` is the JSON it depends on, `key_hash` its
    sha256; the tensor is a content-addressed blob, which keeps `verify` and `gc` in charge of it."""

    __tablename__ = "derived_tensors"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[dict[str, Any]]
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Manifest hash of the version it was computed from: `gc --purge` drops the row once no unpurged
    # version has that manifest. NULL for values that depend on no version.
    depends_on: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Analysis(Base):
    """What an interpretability method computed from a version without changing it (a linear relational
    embedding, a function vector, a probe, a circuit): results, not caches, so `gc` keeps them while
    their version has content. `input_hash` is the sha256 of the data it was computed on."""

    __tablename__ = "analyses"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    params: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    input_hash: Mapped[str] = mapped_column(String(64))
    package_version: Mapped[str] = mapped_column(String(32))
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AnalysisTensor(Base):
    """(analysis, tensor name) -> blob, as a manifest entry is for a version."""

    __tablename__ = "analysis_tensors"

    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(512), primary_key=True)
    blob_sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"), index=True)
