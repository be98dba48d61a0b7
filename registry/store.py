"""The registry: models, versions, their manifests of blobs, provenance, tags and aliases.

`Registry.create_version` is the single place that makes a version visible. Blobs are written first
(each atomically); then one write transaction assigns the version number, inserts the manifest,
provenance and parent edges, and commits. A crash at any point leaves either no version or a whole one,
plus at worst some unreferenced blob files that `gc` removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from typing import Any, TypeVar

import torch
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from modelzoo.registry.blobs import FACTORED, BlobStore, Factors, LocalDirectoryBackend, StoredBlob, tensor_digest
from modelzoo.registry.db import Database
from modelzoo.registry.errors import BadInput, Corrupted, NotFound
from modelzoo.registry.factors import FactorRow, LowRank, factor_rows, merge, worth_factoring
from modelzoo.registry.records import AliasEvent, ParentInfo, VersionInfo
from modelzoo.registry.refs import check_alias_name, check_model_name, check_tag, ref_of, resolve
from modelzoo.registry.safetensors_io import dtype_name, tensor_bytes
from modelzoo.registry.schema import (
    Alias,
    Analysis,
    AuditEvent,
    Blob,
    BlobFactors,
    ManifestEntry,
    Model,
    Provenance,
    SourceFile,
    Tag,
    Version,
    VersionParent,
)
from modelzoo.registry.settings import Settings

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
EntryKey = tuple[str, str]  # (kind, name): kind is "tensor" or "file"
Staged = dict[EntryKey, StoredBlob]
T = TypeVar("T")
WRITE_ATTEMPTS = 20
STAGING_THREADS = 2
# import, train, finetune, edit, merge, compose, quantize, distill; plugins may add their own
RELATION_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# Commits take this PostgreSQL advisory lock shared and gc takes it exclusively, so gc never deletes
# a blob file that a commit in flight has just found already present.
GC_LOCK_KEY = 7350002


@dataclass(frozen=True)
class NewVersion:
    """Everything about a version except its content: who made it, how, from what."""

    model: str
    family: str
    config: dict[str, Any]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    description: str = ""
    model_tags: dict[str, str] = field(default_factory=dict)
    parents: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (ref, relation, evidence)
    source_files: dict[str, tuple[str, int]] = field(default_factory=dict)  # imported file -> (sha256, bytes)


class _BlobVanished(Exception):
    """A blob that staging found present was removed before the commit (a concurrent gc)."""


def manifest_hash(entries: Mapping[EntryKey, str]) -> str:
    h = hashlib.sha256()
    for (kind, name), sha in sorted(entries.items()):
        h.update(f"{kind}\t{name}\t{sha}\n".encode())
    return h.hexdigest()


def _is_retryable(error: Exception) -> bool:
    if isinstance(error, IntegrityError | _BlobVanished):
        return True
    if isinstance(error, OperationalError | DBAPIError):
        message = str(getattr(error, "orig", error)).lower()
        return any(s in message for s in ("locked", "busy", "deadlock", "could not serialize"))
    return False


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere. A finite sum proves it (NaN and Inf propagate through a sum) at memory
    speed; only when the sum is not finite (a real NaN, or a float overflow) is every element checked."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


class Registry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.db = Database(settings.database_url)
        self.db.ensure_schema()
        self.blobs = BlobStore(LocalDirectoryBackend(settings.blob_dir))

    # ---- writing -------------------------------------------------------------------------------

    def stage_tensors(
        self,
        tensors: Iterable[tuple[str, torch.Tensor]],
        allow_nonfinite: bool = False,
        progress: Progress | None = None,
        total_bytes: int = 0,
    ) -> Staged:
        """Write each tensor's blob (deduplicated) and return the manifest entries for them.

        Two threads overlap one tensor's hashing with another's write and fsync (hashlib, file I/O and
        torch all release the GIL). On any failure the blobs written so far are removed again.
        """

        def stage_one(name: str, tensor: torch.Tensor) -> StoredBlob:
            if not allow_nonfinite and not is_finite(tensor):
                raise BadInput(f"tensor {name!r} holds NaN or Inf values; pass --allow-nonfinite to keep them")
            return self.blobs.put_tensor(tensor)

        futures: dict[EntryKey, Future[StoredBlob]] = {}
        pool = ThreadPoolExecutor(max_workers=STAGING_THREADS)
        try:
            for name, tensor in tensors:
                if not name or ("tensor", name) in futures:
                    raise BadInput(f"tensor name {name!r} is empty or appears twice")
                futures[("tensor", name)] = pool.submit(stage_one, name, tensor)
            staged: Staged = {}
            done = 0
            for key, future in futures.items():
                staged[key] = future.result()
                done += staged[key].nbytes
                if progress:
                    progress(done, total_bytes)
            return staged
        except BaseException:  # Ctrl-C included: queued tensors never start, every written blob goes again
            pool.shutdown(wait=True, cancel_futures=True)
            self.discard({key: f.result() for key, f in futures.items()
                          if not f.cancelled() and f.exception() is None})
            raise
        finally:
            pool.shutdown()

    def discard(self, staged: Staged) -> None:
        """Undo a failed staging: remove the blobs it wrote that no committed version has since claimed.

        Runs as a write transaction, like gc, so it cannot race a commit that found those files present.
        """
        written = {b.sha256: b.location for s in staged.values() for b in s.with_parts() if b.written}
        if not written:
            return
        with contextlib.suppress(Exception):  # wait for in-flight publishes; a failed one removed its file
            self.blobs.sync()
        with self.db.write() as session:
            if not self.db.is_sqlite:
                session.execute(text(f"SELECT pg_advisory_xact_lock({GC_LOCK_KEY})"))
            claimed = self._existing_blobs(session, list(written))
            self.blobs.delete(loc for sha, loc in written.items() if sha not in claimed)

    def stage_files(self, files: Mapping[str, bytes]) -> Staged:
        staged: Staged = {}
        try:
            for path, data in files.items():
                staged[("file", path)] = self.blobs.put_file(data)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def create_version(
        self, spec: NewVersion, staged: Staged, restage: Callable[[], Staged] | None = None
    ) -> VersionInfo:
        """Make a version of staged blobs visible in one transaction (retried on write conflicts).

        `restage` writes the blobs again if a concurrent gc removed one that staging found present; the
        blobs of the staging it replaces are discarded first, so none is left behind whatever happens.
        """
        check_model_name(spec.model)
        for key, value in spec.model_tags.items():
            check_tag(key, value)
        for _, relation, _ in spec.parents:
            if not RELATION_PATTERN.match(relation):
                raise BadInput(f"invalid relation {relation!r}: lower-case letters, digits, '-' or '_'")

        first = staged

        def restage_all() -> None:
            nonlocal staged
            assert restage is not None
            self.discard(staged)
            staged = restage()

        try:
            version_id = self.write_retrying(lambda session: self._insert_version(session, spec, staged),
                                             restage_all if restage is not None else None)
        except BaseException:
            if staged is not first:  # the caller discards what it staged; a restaging is ours to undo
                self.discard(staged)
            raise
        return self.info_by_id(version_id)

    def write_retrying(self, body: Callable[[Session], T], restage: Callable[[], None] | None = None) -> T:
        """Run `body` in a write transaction once the blobs written so far are durable; retried on write
        conflicts, and after `restage` when a blob it claims was removed by a concurrent gc."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                self.blobs.sync()
                with self.db.write() as session:
                    return body(session)
            except Exception as error:
                if not _is_retryable(error) or attempt == WRITE_ATTEMPTS - 1:
                    raise
                log.debug("write conflict (%s); retrying", error)
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
                if isinstance(error, _BlobVanished):
                    if restage is None:
                        raise
                    restage()
        raise AssertionError("unreachable")

    def claim_blobs(self, session: Session, blobs: Iterable[StoredBlob]) -> list[StoredBlob]:
        """Insert the rows of blobs this transaction will reference; return those that were new.

        On PostgreSQL under gc's lock held shared, so gc cannot remove a file between the check that it
        is still there (staging may have found it present, then a gc ran) and the commit."""
        if not self.db.is_sqlite:
            session.execute(text(f"SELECT pg_advisory_xact_lock_shared({GC_LOCK_KEY})"))
        shas = {part.sha256: part for blob in blobs for part in blob.with_parts()}
        existing = self._existing_blobs(session, list(shas))
        new_blobs = [b for sha, b in shas.items() if sha not in existing]
        for blob in shas.values():
            if blob.kind == FACTORED:
                if blob.factors is None and blob.sha256 not in existing:  # found in a manifest, since removed
                    raise _BlobVanished(blob.sha256)
            elif not blob.written and not self.blobs.backend.exists(blob.location):
                raise _BlobVanished(blob.sha256)
        if new_blobs:
            session.execute(
                self.insert_ignore(Blob),
                [
                    dict(sha256=b.sha256, kind=b.kind, dtype=b.dtype, shape=list(b.shape) if b.shape else None,
                         nbytes=b.nbytes, location=b.location)
                    for b in new_blobs
                ],
            )
        factored = [(b.sha256, b.factors) for b in new_blobs if b.factors is not None]
        if factored:
            session.execute(BlobFactors.__table__.insert(), [
                dict(sha256=sha, base_sha256=f.base, b_sha256=f.B.sha256, a_sha256=f.A.sha256, scale=f.scale,
                     depth=f.depth)
                for sha, f in factored])
        return new_blobs

    def _insert_version(self, session: Session, spec: NewVersion, staged: Staged) -> int:
        if not self.db.is_sqlite:  # taken before the model row, as gc takes it before anything else
            session.execute(text(f"SELECT pg_advisory_xact_lock_shared({GC_LOCK_KEY})"))
        parents = [(resolve(session, ref), relation, evidence) for ref, relation, evidence in spec.parents]
        model = session.scalar(select(Model).where(Model.name == spec.model).with_for_update())
        if model is None:
            model = Model(name=spec.model, family=spec.family, description=spec.description, next_number=1)
            session.add(model)
            session.flush()
        elif model.family != spec.family:
            raise BadInput(f"model {spec.model!r} is a {model.family} model, not {spec.family}")
        for key, value in spec.model_tags.items():
            self._set_tag(session, model, None, key, value)

        new_blobs = self.claim_blobs(session, staged.values())
        number = model.next_number
        model.next_number = number + 1
        version = Version(
            model_id=model.id,
            number=number,
            config=spec.config,
            manifest_hash=manifest_hash({k: b.sha256 for k, b in staged.items()}),
            logical_bytes=sum(b.nbytes for b in staged.values()),
            added_bytes=sum(b.stored_bytes for b in new_blobs),
        )
        session.add(version)
        session.flush()
        session.execute(
            ManifestEntry.__table__.insert(),
            [dict(version_id=version.id, kind=k, name=n, blob_sha256=b.sha256) for (k, n), b in staged.items()],
        )
        session.add(
            Provenance(
                version_id=version.id,
                method=spec.method,
                params=spec.params,
                metrics=spec.metrics,
                source=spec.source,
                package_version=package_version("modelzoo"),
                duration_s=spec.duration_s,
            )
        )
        for parent, relation, evidence in parents:
            session.add(VersionParent(child_id=version.id, parent_id=parent.id, relation=relation, evidence=evidence))
        if spec.source_files:
            session.execute(SourceFile.__table__.insert(), [
                dict(version_id=version.id, path=path, sha256=sha, nbytes=nbytes)
                for path, (sha, nbytes) in spec.source_files.items()])
        return version.id

    def insert_ignore(self, table: type[Blob]) -> Any:
        """INSERT that skips rows whose key exists (blobs are shared; two writers may add the same one)."""
        dialect = sqlite if self.db.is_sqlite else postgresql
        return dialect.insert(table).on_conflict_do_nothing()

    @staticmethod
    def _existing_blobs(session: Session, shas: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(shas), 500):
            found.update(session.scalars(select(Blob.sha256).where(Blob.sha256.in_(shas[i : i + 500]))))
        return found

    def commit(
        self,
        parent: str,
        changed: Mapping[str, torch.Tensor | LowRank],
        method: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        removed: Iterable[str] = (),
        relation: str = "edit",
        other_parents: Iterable[str] = (),
        duration_s: float = 0.0,
        allow_noop: bool = False,
        allow_nonfinite: bool = False,
        source: Mapping[str, Any] | None = None,
        source_files: Mapping[str, tuple[str, int]] | None = None,
        tags: Mapping[str, str] | None = None,
        files: Mapping[str, bytes] | None = None,
        description: str = "",
    ) -> VersionInfo:
        """The one way to derive a version: the parent's manifest with `changed` tensors (and `files`, such
        as a config.json an edit must change) replaced or added.

        A `LowRank` change of a parent's tensor is stored as factors over it where the policy of
        `registry/factors.py` allows, else merged and stored dense; readers see the merged tensor either way.
        """
        with self.db.read() as session:
            base = resolve(session, parent)
            parent_ref, family, config = ref_of(base), base.model.family, dict(base.config)
            manifest = self._manifest(session, base.id)
        removed = set(removed)
        unknown = sorted(n for n in removed if ("tensor", n) not in manifest)
        if unknown:
            raise BadInput(f"cannot remove tensors that {parent_ref} does not have: {unknown[:3]}")

        def stage() -> Staged:
            items = list(changed.items())  # read again on each staging: the caller's values may have changed
            dense = [(n, t) for n, t in items if not isinstance(t, LowRank)]
            low_rank = {n: c for n, c in items if isinstance(c, LowRank)}
            with self.db.read() as session:
                entries = self._staged_manifest(session, base.id)
            staged = self.stage_tensors(dense, allow_nonfinite=allow_nonfinite)
            try:
                staged.update(self.stage_low_rank(entries, low_rank, allow_nonfinite))
                staged.update(self.stage_files(files or {}))
            except BaseException:
                self.discard(staged)
                raise
            for n in removed:
                del entries[("tensor", n)]
            entries.update(staged)
            return entries

        staged = stage()
        if not allow_noop and {k: b.sha256 for k, b in staged.items()} == manifest:
            raise BadInput(f"this {method} changes no tensor of {parent_ref}; nothing registered (--allow-noop)")
        spec = NewVersion(
            model=name or parent_ref.split("@")[0],
            family=family,
            config=config,
            method=method,
            params=dict(params or {}),
            metrics=dict(metrics or {}),
            source=dict(source or {}),
            duration_s=duration_s,
            description=description,
            model_tags=dict(tags or {}),
            parents=[(parent_ref, relation, {})] + [(ref, relation, {}) for ref in other_parents],
            source_files=dict(source_files or {}),
        )
        try:
            return self.create_version(spec, staged, restage=stage)
        except BaseException:
            self.discard(staged)
            raise

    def stage_low_rank(self, parent: Staged, changes: Mapping[str, LowRank], allow_nonfinite: bool = False) -> Staged:
        """Stage each change over the parent's tensor of that name: its B and A blobs and a factored entry,
        or the merged tensor as a dense blob where the depth and size policy says so."""
        if not changes:
            return {}
        bases = {name: parent.get(("tensor", name)) for name in changes}
        missing = sorted(name for name, blob in bases.items() if blob is None)
        if missing:
            raise BadInput(f"a low-rank change needs the parent's tensor, and it has no {missing[:3]}")
        with self.db.read() as session:
            rows = factor_rows(session, [b.sha256 for b in bases.values() if b is not None and b.kind == FACTORED])
        staged: Staged = {}
        try:
            for name, change in changes.items():
                base = bases[name]
                assert base is not None and base.shape is not None and base.dtype is not None
                change.check(base.shape, f"tensor {name!r}")
                merged = merge(self._materialize(base.sha256, rows, verify=True), change)
                if not allow_nonfinite and not all(map(is_finite, (change.B, change.A, merged))):
                    raise BadInput(f"the change of tensor {name!r} holds NaN or Inf values")
                depth = rows[base.sha256].depth if base.sha256 in rows else 0
                if not worth_factoring(change, base.shape, merged.element_size(), depth):
                    staged[("tensor", name)] = self.blobs.put_tensor(merged)
                    continue
                data = tensor_bytes(merged)
                sha = tensor_digest(dtype_name(merged.dtype), tuple(merged.shape), data)
                B, A = (self.blobs.put_tensor(t.contiguous()) for t in (change.B, change.A))
                staged[("tensor", name)] = StoredBlob(sha, FACTORED, base.dtype, base.shape, data.nbytes, False,
                                                      Factors(base.sha256, B, A, float(change.scale), depth + 1))
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def _materialize(self, sha256: str, rows: Mapping[str, FactorRow], verify: bool) -> torch.Tensor:
        """A tensor blob's value: a map of a dense blob, or a factored one merged onto its base."""
        row = rows.get(sha256)
        if row is None:
            return self.blobs.get_tensor(sha256, verify=verify)
        change = LowRank(*(self.blobs.get_tensor(sha, verify=verify) for sha in (row.b, row.a)), row.scale)
        if row.base in rows or not verify:
            return merge(self._materialize(row.base, rows, verify), change)
        # A dense base's hash is checked on a second thread while the merge reads it: both stream the
        # same bytes, so the merge costs little more time than the check alone.
        with ThreadPoolExecutor(max_workers=1) as checker:
            problem = checker.submit(self.blobs.check, row.base, "tensor")
            merged = merge(self.blobs.get_tensor(row.base, verify=False), change)
            if problem.result() is not None:
                raise Corrupted(f"blob {row.base[:12]} is damaged ({problem.result()}); run `zoo verify`")
        return merged

    def tensor_by_sha(self, sha256: str, verify: bool = True) -> torch.Tensor:
        """One tensor blob's value, merged if it is factored."""
        with self.db.read() as session:
            rows = factor_rows(session, [sha256])
        return self._materialize(sha256, rows, verify)

    def check_blob(self, sha256: str, kind: str) -> str | None:
        """What is wrong with a blob (None when intact); a factored tensor is as sound as its parts."""
        if kind != FACTORED:
            return self.blobs.check(sha256, kind)
        with self.db.read() as session:
            rows = factor_rows(session, [sha256])
        if sha256 not in rows:
            return "a factored tensor without its factors"
        for row in rows.values():
            for role, part in (("B", row.b), ("A", row.a)) + ((("base", row.base),) if row.base not in rows else ()):
                problem = self.blobs.check(part, "tensor")
                if problem is not None:
                    return f"its {role} blob {part[:12]} is damaged ({problem})"
        return None

    def _staged_manifest_by_ref(self, ref: str) -> Staged:
        with self.db.read() as session:
            return self._staged_manifest(session, resolve(session, ref).id)

    @staticmethod
    def _staged_manifest(session: Session, version_id: int) -> Staged:
        rows = session.execute(
            select(ManifestEntry.kind, ManifestEntry.name, Blob)
            .join(Blob, Blob.sha256 == ManifestEntry.blob_sha256)
            .where(ManifestEntry.version_id == version_id)
        )
        return {
            (kind, name): StoredBlob(
                b.sha256, b.kind, b.dtype, tuple(b.shape) if b.shape else None, b.nbytes, False
            )
            for kind, name, b in rows
        }

    @staticmethod
    def _manifest(session: Session, version_id: int) -> dict[EntryKey, str]:
        rows = session.execute(
            select(ManifestEntry.kind, ManifestEntry.name, ManifestEntry.blob_sha256).where(
                ManifestEntry.version_id == version_id
            )
        )
        return {(kind, name): sha for kind, name, sha in rows}

    # ---- reading -------------------------------------------------------------------------------

    def info(self, ref: str, include_deleted: bool = False) -> VersionInfo:
        with self.db.read() as session:
            return self._info(session, resolve(session, ref, include_deleted))

    def info_by_id(self, version_id: int) -> VersionInfo:
        with self.db.read() as session:
            version = session.get(Version, version_id)
            if version is None:
                raise NotFound(f"version id {version_id} does not exist")
            return self._info(session, version)

    def _info(self, session: Session, v: Version) -> VersionInfo:
        prov = v.provenance
        parents = session.execute(
            select(VersionParent, Version).join(Version, Version.id == VersionParent.parent_id).where(
                VersionParent.child_id == v.id
            )
        )
        tags = {t.key: t.value for t in session.scalars(select(Tag).where(Tag.model_id == v.model_id)) if
                t.version_id in (None, v.id)}
        aliases = session.scalars(select(Alias.name).where(Alias.version_id == v.id)).all()
        count = session.scalar(
            select(func.count()).where(ManifestEntry.version_id == v.id, ManifestEntry.kind == "tensor")
        )
        analyses = session.scalar(select(func.count()).where(Analysis.version_id == v.id))
        return VersionInfo(
            id=v.id,
            ref=ref_of(v),
            model=v.model.name,
            family=v.model.family,
            number=v.number,
            manifest_hash=v.manifest_hash,
            status=v.status,
            created_at=v.created_at,
            method=prov.method,
            params=prov.params,
            metrics=prov.metrics,
            source=prov.source,
            package_version=prov.package_version,
            duration_s=prov.duration_s,
            logical_bytes=v.logical_bytes,
            added_bytes=v.added_bytes,
            tensor_count=count or 0,
            parents=[ParentInfo(ref_of(p), e.relation, e.evidence) for e, p in parents],
            tags=tags,
            aliases=sorted(aliases),
            config=v.config,
            analyses=analyses or 0,
        )

    def versions(self, model: str) -> list[VersionInfo]:
        with self.db.read() as session:
            m = session.scalar(select(Model).where(Model.name == model))
            if m is None:
                raise NotFound(f"no model named {model!r}; `zoo list` shows the registered models")
            return [self._info(session, v) for v in m.versions]

    def manifest(self, ref: str) -> dict[EntryKey, StoredBlob]:
        return self._staged_manifest_by_ref(ref)

    def load_tensors(
        self, ref: str, names: Iterable[str] | None = None, verify: bool = True
    ) -> dict[str, torch.Tensor]:
        """The version's tensors as memory-mapped torch tensors, each checked against its hash; a factored
        tensor is merged from its parts (each checked against its own hash) into memory of its own."""
        manifest = self.manifest(ref)
        wanted = None if names is None else set(names)
        if wanted is not None:
            missing = sorted(n for n in wanted if ("tensor", n) not in manifest)
            if missing:
                raise NotFound(f"{ref} has no tensors {missing[:3]}")
        chosen = {name: blob for (kind, name), blob in sorted(manifest.items())
                  if kind == "tensor" and (wanted is None or name in wanted)}
        factored = [b.sha256 for b in chosen.values() if b.kind == FACTORED]
        rows: dict[str, FactorRow] = {}
        if factored:
            with self.db.read() as session:
                rows = factor_rows(session, factored)
        return {name: self._materialize(blob.sha256, rows, verify) for name, blob in chosen.items()}

    def load_files(self, ref: str, verify: bool = True) -> dict[str, bytes]:
        return {
            name: self.blobs.get_file(blob.sha256, verify=verify)
            for (kind, name), blob in sorted(self.manifest(ref).items())
            if kind == "file"
        }

    # ---- labels --------------------------------------------------------------------------------

    def tag(self, ref: str, key: str, value: str) -> None:
        """A model's name tags the model; any other reference (`name@N`, a hash prefix) tags one version.
        Every change is audited."""
        check_tag(key, value)
        with self.db.write() as session:
            model = session.scalar(select(Model).where(Model.name == ref))
            if model is not None:
                self._set_tag(session, model, None, key, value)
            else:
                version = resolve(session, ref)
                self._set_tag(session, version.model, version.id, key, value)

    @staticmethod
    def _set_tag(session: Session, model: Model, version_id: int | None, key: str, value: str) -> None:
        tag = session.scalar(
            select(Tag).where(Tag.model_id == model.id, Tag.version_id.is_(version_id) if version_id is None
                              else Tag.version_id == version_id, Tag.key == key)
        )
        if tag is not None and tag.value == value:
            return
        if tag is None:
            session.add(Tag(model_id=model.id, version_id=version_id, key=key, value=value))
        else:
            tag.value = value
        session.add(AuditEvent(kind="tag", model_id=model.id, version_id=version_id, name=key, value=value))

    def set_alias(self, ref: str, alias: str) -> VersionInfo:
        check_alias_name(alias)
        with self.db.write() as session:
            version = resolve(session, ref)
            existing = session.get(Alias, (version.model_id, alias))
            if existing is None:
                session.add(Alias(model_id=version.model_id, name=alias, version_id=version.id))
            else:
                existing.version_id = version.id
            session.add(AuditEvent(kind="alias", model_id=version.model_id, version_id=version.id, name=alias))
            version_id = version.id
        return self.info_by_id(version_id)

    def alias_history(self, model: str, alias: str) -> list[AliasEvent]:
        with self.db.read() as session:
            m = session.scalar(select(Model).where(Model.name == model))
            if m is None:
                raise NotFound(f"no model named {model!r}")
            events = session.execute(
                select(AuditEvent, Version)
                .outerjoin(Version, Version.id == AuditEvent.version_id)
                .where(AuditEvent.model_id == m.id, AuditEvent.kind == "alias", AuditEvent.name == alias)
                .order_by(AuditEvent.id)
            ).all()
            if not events:
                raise NotFound(f"{model} never had an alias {alias!r}")
            return [AliasEvent(alias, f"{model}@{v.number}" if v else None, e.at) for e, v in events]

    def delete(self, ref: str) -> VersionInfo:
        """Soft delete: the version disappears from lists and `latest`; `gc --purge` frees its blobs."""
        with self.db.write() as session:
            version = resolve(session, ref)
            version.status = "deleted"
            session.execute(delete(Alias).where(Alias.version_id == version.id))
            version_id = version.id
        return self.info_by_id(version_id)

    def restore(self, ref: str) -> VersionInfo:
        with self.db.write() as session:
            version = resolve(session, ref, include_deleted=True)
            if session.scalar(select(func.count()).where(ManifestEntry.version_id == version.id)) == 0:
                raise NotFound(f"{ref} was purged by gc; its content is gone")
            version.status = "ready"
            version_id = version.id
        return self.info_by_id(version_id)

