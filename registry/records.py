"""Typed records that cross the registry's boundary (API and CLI); each turns into plain JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


def to_json(record: Any) -> Any:
    """A record (or list of records) as JSON-ready data."""
    if isinstance(record, list):
        return [to_json(r) for r in record]
    data = record if isinstance(record, dict) else asdict(record)
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


@dataclass(frozen=True)
class ParentInfo:
    ref: str
    relation: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VersionInfo:
    id: int
    ref: str
    model: str
    family: str
    number: int
    manifest_hash: str
    status: str
    created_at: datetime
    method: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    source: dict[str, Any]
    package_version: str
    duration_s: float
    logical_bytes: int
    added_bytes: int
    tensor_count: int
    parents: list[ParentInfo]
    tags: dict[str, str]
    aliases: list[str]
    config: dict[str, Any]
    analyses: int = 0  # stored analyses of this version (`zoo analyses REF` lists them)


@dataclass(frozen=True)
class ModelSummary:
    name: str
    family: str
    description: str
    latest: int | None
    versions: int
    tags: dict[str, str]
    created_at: datetime
    matching_versions: list[int]  # the versions that satisfied the filters (all live ones without filters)


@dataclass(frozen=True)
class Related:
    """A registered version that shares tensor bytes with another, and how much."""

    ref: str
    shared_bytes: int
    fraction: float  # of the other version's logical bytes


@dataclass(frozen=True)
class FindHit:
    sha256: str
    kind: str  # "tensor" | "factored" | "file" | "manifest" | "source file" (a file the version was imported
    # from) | "factor" (the B or A of a factored tensor)
    name: str  # tensor name or file path ("" for a manifest hash)
    ref: str


@dataclass(frozen=True)
class StoreStats:
    models: int
    versions: int
    blobs: int
    stored_bytes: int  # each distinct blob once
    logical_bytes: int  # the sum of every live version's full size
    disk_bytes: int  # what the blob files take on disk, headers included
    derived_bytes: int  # the part of stored_bytes that only editor caches (derived tensors) hold

    @property
    def dedup_ratio(self) -> float:
        weights = self.stored_bytes - self.derived_bytes
        return self.logical_bytes / weights if weights else 1.0


@dataclass(frozen=True)
class LineageNode:
    ref: str
    relation: str
    method: str
    params: dict[str, Any]
    depth: int


@dataclass(frozen=True)
class Lineage:
    ref: str
    ancestors: list[LineageNode]
    descendants: list[LineageNode]


@dataclass(frozen=True)
class TensorChange:
    tensor: str
    status: str  # "changed" | "added" | "removed"
    relative_change: float | None


@dataclass(frozen=True)
class Diff:
    a: str
    b: str
    changed: list[TensorChange]
    unchanged: int


@dataclass(frozen=True)
class DamagedBlob:
    sha256: str
    problem: str
    versions: list[str]
    derived: list[str]  # kinds of editor caches (derived tensors) that hold it
    analyses: list[str] = field(default_factory=list)  # stored analyses that hold it


@dataclass(frozen=True)
class VerifyReport:
    blobs_checked: int
    bytes_checked: int
    damaged: list[DamagedBlob]

    @property
    def ok(self) -> bool:
        return not self.damaged


@dataclass(frozen=True)
class GcReport:
    blobs_removed: int
    bytes_freed: int
    stray_files_removed: int
    versions_purged: int
    derived_dropped: int
    analyses_dropped: int = 0  # analyses of the purged versions


@dataclass(frozen=True)
class AnalysisInfo:
    """A stored analysis of a version; `tensors` names its stored tensors."""

    id: int
    kind: str
    ref: str
    created_at: datetime
    params: dict[str, Any]
    metrics: dict[str, Any]
    input_hash: str
    package_version: str
    duration_s: float
    tensors: list[str]


@dataclass(frozen=True)
class AliasEvent:
    alias: str
    ref: str | None
    at: datetime
