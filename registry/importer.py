"""`zoo import`: read a model from disk and register it as a version."""

from __future__ import annotations

import time
from pathlib import Path

from modelzoo.registry.formats import ImportSource, read_source
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.refs import check_model_name
from modelzoo.registry.store import NewVersion, Progress, Registry


def import_path(
    registry: Registry,
    path: Path,
    name: str,
    *,
    family: str | None = None,
    config_path: Path | None = None,
    tags: dict[str, str] | None = None,
    parents: list[tuple[str, str, dict]] | None = None,
    description: str = "",
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> VersionInfo:
    check_model_name(name)
    source = read_source(path, family=family, config_path=config_path)
    return register_source(
        registry, source, name, tags=tags, parents=parents, description=description,
        allow_nonfinite=allow_nonfinite, progress=progress,
    )


def register_source(
    registry: Registry,
    source: ImportSource,
    name: str,
    *,
    method: str = "import",
    params: dict | None = None,
    metrics: dict | None = None,
    tags: dict[str, str] | None = None,
    parents: list[tuple[str, str, dict]] | None = None,
    description: str = "",
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> VersionInfo:
    """Store a source's blobs and register it; the blobs this call wrote are removed again on failure."""
    started = time.perf_counter()
    total = source.total_bytes

    def stage():  # type: ignore[no-untyped-def]
        staged = registry.stage_tensors(source.tensors(), allow_nonfinite, progress, total)
        staged.update(registry.stage_files(source.files))
        return staged

    staged = stage()
    try:
        spec = NewVersion(
            model=name,
            family=source.family,
            config=source.config,
            method=method,
            params=params or {},
            metrics=metrics or {},
            source=source.source_record(),
            duration_s=time.perf_counter() - started,
            description=description,
            model_tags=tags or {},
            parents=parents or [],
        )
        return registry.create_version(spec, staged, restage=stage)
    except BaseException:
        registry.discard(staged)
        raise
