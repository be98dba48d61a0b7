"""`zoo import`: read a model from disk and register it as a version.

Every import reports the registered versions that share the most tensor bytes with it (kept in its
provenance). A parent can be declared (`base`), taken from the model card's `base_model` when that names a
registered model, or detected (`base="auto"`: the best match, if it shares at least half the bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sqlalchemy import select

from modelzoo.registry import adapters, single_file
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import get_family
from modelzoo.registry.files import open_regular
from modelzoo.registry.formats import ImportSource, read_source
from modelzoo.registry.queries import related_versions
from modelzoo.registry.records import Related, VersionInfo
from modelzoo.registry.refs import check_model_name
from modelzoo.registry.schema import Model
from modelzoo.registry.store import NewVersion, Progress, Registry, Staged

AUTO_BASE = "auto"
AUTO_BASE_MIN_FRACTION = 0.5


def import_path(
    registry: Registry,
    path: Path,
    name: str,
    *,
    family: str | None = None,
    config_path: Path | None = None,
    tags: dict[str, str] | None = None,
    base: str | None = None,
    relation: str | None = None,
    description: str = "",
    allow_nonfinite: bool = False,
    follow_symlinks: bool = False,
    progress: Progress | None = None,
) -> VersionInfo:
    """Import a model, or a LoRA adapter as a child of `base` (relation "adapter" unless given)."""
    check_model_name(name)
    if adapters.adapter_format(Path(path)) is not None:
        return import_adapter(registry, Path(path), name, base=base, family=family, relation=relation,
                              tags=tags, description=description, follow_symlinks=follow_symlinks)
    if family in (None, "diffusion") and single_file.is_single_file_checkpoint(Path(path)):
        with single_file.converted(registry, Path(path), config_path) as converted:
            return register_source(
                registry, converted, name, tags=tags, base=base, relation=relation or "finetune",
                description=description, allow_nonfinite=allow_nonfinite, progress=progress,
            )
    source = read_source(path, family=family, config_path=config_path, follow_symlinks=follow_symlinks)
    return register_source(
        registry, source, name, tags=tags, base=base, relation=relation or "finetune", description=description,
        allow_nonfinite=allow_nonfinite, progress=progress,
    )


def import_adapter(
    registry: Registry,
    path: Path,
    name: str,
    *,
    base: str | None,
    family: str | None = None,
    relation: str | None = None,
    tags: dict[str, str] | None = None,
    description: str = "",
    follow_symlinks: bool = False,
) -> VersionInfo:
    """Register a LoRA adapter (`registry/adapters.py`) as a factored child of `base`, its config in the
    provenance; refused whole, with nothing stored, when it does not fit the base."""
    if not base or base == AUTO_BASE:
        raise BadInput(f"{path} is a LoRA adapter: name the version it adapts with --base REF")
    started = time.perf_counter()
    source = adapters.read_adapter(path, follow_symlinks)
    info = registry.info(base)
    if family and family != info.family:
        raise BadInput(f"the adapter's base {info.ref} is a {info.family} model, not {family}")
    model = get_family(info.family).load(registry, info.ref)
    stored = {n for k, n in registry.manifest(info.ref) if k == "tensor"}
    changes = adapters.adapter_changes(model, source, stored)
    return registry.commit(
        info.ref, changes, "import", {"adapter": adapters.json_safe(source.record())},
        {"ranks": adapters.rank_summary(changes), "adapter_bytes": source.tensor_bytes, "tensors": len(changes)},
        name=name, relation=relation or adapters.RELATION, duration_s=time.perf_counter() - started,
        source={"path": str(source.path), "format": f"lora-{source.format}"},
        source_files=_hash_files(source.originals), tags=tags, description=description,
    )


def register_source(
    registry: Registry,
    source: ImportSource,
    name: str,
    *,
    method: str = "import",
    params: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    base: str | None = None,
    relation: str = "finetune",
    description: str = "",
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> VersionInfo:
    """Store a source's blobs and register it; the blobs this call wrote are removed again on failure."""
    started = time.perf_counter()
    total = source.total_bytes

    def stage() -> Staged:
        staged = registry.stage_tensors(source.tensors(), allow_nonfinite, progress, total)
        try:
            staged.update(registry.stage_files(source.files))
        except BaseException:
            registry.discard(staged)
            raise
        return staged

    # The originals' own hashes are read on a thread of their own while staging hashes the tensors.
    with ThreadPoolExecutor(max_workers=1) as hasher:
        originals = hasher.submit(_hash_files, source.originals)
        staged = stage()
    try:
        related = related_versions(registry, {b.sha256: b.nbytes for (k, _), b in staged.items() if k == "tensor"})
        parents = _parents(registry, source, base, relation, related)
        spec = NewVersion(
            model=name,
            family=source.family,
            config=source.config,
            method=method,
            params=params or {},
            metrics=metrics or {},
            source={**source.source_record(), "related": [dataclasses.asdict(r) for r in related]},
            duration_s=time.perf_counter() - started,
            description=description,
            model_tags=tags or {},
            parents=parents,
            source_files=originals.result(),
        )
        return registry.create_version(spec, staged, restage=stage)
    except BaseException:
        registry.discard(staged)
        raise


def _hash_files(files: dict[str, Path]) -> dict[str, tuple[str, int]]:
    """name -> (sha256, bytes) of each file, read as a regular file without blocking."""
    hashes = {}
    for name, path in files.items():
        with open_regular(path) as fd, open(fd, "rb", closefd=False) as f:
            hashes[name] = (hashlib.file_digest(f, "sha256").hexdigest(), os.fstat(fd).st_size)
    return hashes


def _parents(
    registry: Registry, source: ImportSource, base: str | None, relation: str, related: list[Related]
) -> list[tuple[str, str, dict[str, Any]]]:
    if base == AUTO_BASE:
        best = related[0] if related else None
        if best is None or best.fraction < AUTO_BASE_MIN_FRACTION:
            return []
        evidence = {"detected": True, "shared_bytes": best.shared_bytes, "fraction": round(best.fraction, 4)}
        return [(best.ref, relation, evidence)]
    if base:
        return [(base, relation, {"declared": True})]
    if source.base_model:
        with registry.db.read() as session:
            known = session.scalar(select(Model.name).where(Model.name == source.base_model.split("/")[-1]))
        if known:
            return [(f"{known}@latest", relation, {"model_card_base_model": source.base_model})]
    return []
