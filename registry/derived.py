"""Derived tensors: what editors compute from a version and reuse across edits (MEMIT's covariance C of
a layer's keys, AlphaEdit's accumulated K K^T of earlier edits).

They are costly to recompute (minutes of model passes) and cheap to keep, so they live in the registry
like weights do: the tensor is a content-addressed blob, and a `derived_tensors` row maps (kind, key) to
it, the key being the JSON of whatever the value depends on (for C: manifest hash, layer, corpus hash,
sample count, dtype). `zoo verify` checks these blobs, `zoo gc` keeps them, and a PostgreSQL registry
shares them between everyone who edits the same version. A damaged or missing blob reads as absent, so
the caller recomputes it and the row is replaced.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from modelzoo.registry.errors import Corrupted, NotFound
from modelzoo.registry.schema import Blob, DerivedTensor, utcnow
from modelzoo.registry.store import Registry


@dataclass(frozen=True)
class DerivedValue:
    """A value to store under (kind, key): what an editor hands back for `apply_edit` to keep once the
    child version is committed (AlphaEdit's keys belong to the child's weights, so they must not outlive
    an edit that registered nothing)."""

    kind: str
    key: dict[str, Any]
    tensor: torch.Tensor
    meta: dict[str, Any]


@dataclass(frozen=True)
class Derived:
    tensor: torch.Tensor
    meta: dict[str, Any]  # what computing it cost and saw (e.g. tokens counted, seconds)


def key_hash(kind: str, key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"kind": kind, **key}, sort_keys=True).encode()).hexdigest()


class DerivedTensors:
    def __init__(self, registry: Registry):
        self.registry = registry

    def get(self, kind: str, key: Mapping[str, Any]) -> Derived | None:
        with self.registry.db.read() as session:
            row = session.execute(
                select(DerivedTensor.meta, Blob.sha256)
                .join(Blob, Blob.sha256 == DerivedTensor.blob_sha256)
                .where(DerivedTensor.kind == kind, DerivedTensor.key_hash == key_hash(kind, key))
            ).first()
        if row is None:
            return None
        meta, sha = row
        try:
            tensor = self.registry.blobs.get_tensor(sha).clone()  # detach from the mapped file
        except (Corrupted, NotFound):
            return None  # recomputed by the caller and put again
        return Derived(tensor, dict(meta))

    def put(self, kind: str, key: Mapping[str, Any], tensor: torch.Tensor, meta: Mapping[str, Any],
            depends_on: str | None = None) -> None:
        """Store (or replace) the value for (kind, key): the blob first, then one transaction for the rows.
        `depends_on` is the manifest hash of the version it was computed from (see `DerivedTensor`)."""
        blobs = self.registry.blobs
        blob = blobs.put_tensor(tensor)
        if not blob.written and blobs.check(blob.sha256, blob.kind) is not None:
            blob = blobs.put_tensor(tensor, overwrite=True)  # the damaged copy that made `get` miss

        def restage() -> None:
            nonlocal blob
            blob = blobs.put_tensor(tensor)

        def upsert(session: Session) -> None:
            self.registry.claim_blobs(session, [blob])
            # an upsert: two editors that computed the same value at once both succeed
            dialect = sqlite if self.registry.db.is_sqlite else postgresql
            insert = dialect.insert(DerivedTensor).values(
                kind=kind, key_hash=key_hash(kind, key), key=dict(key), blob_sha256=blob.sha256, meta=dict(meta),
                depends_on=depends_on, created_at=utcnow())
            session.execute(insert.on_conflict_do_update(
                index_elements=["kind", "key_hash"],
                set_={name: insert.excluded[name] for name in ("blob_sha256", "meta", "depends_on", "created_at")}))

        self.registry.write_retrying(upsert, restage)
