"""The public Python API. The CLI is a thin layer over exactly these calls."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from modelzoo.editors.apply import apply_edit
from modelzoo.editors.base import EditProgress
from modelzoo.registry import integrity, queries
from modelzoo.registry import lineage as lineage_queries
from modelzoo.registry.exporter import export_version
from modelzoo.registry.families.base import LoadedModel, Sample, get_family
from modelzoo.registry.importer import import_path
from modelzoo.registry.queries import ListFilter
from modelzoo.registry.records import (
    AliasEvent,
    Diff,
    FindHit,
    GcReport,
    Lineage,
    ModelSummary,
    StoreStats,
    VerifyReport,
    VersionInfo,
)
from modelzoo.registry.settings import Settings
from modelzoo.registry.store import Progress, Registry


class Zoo:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = Registry(settings)

    def import_(
        self,
        path: str | Path,
        name: str,
        *,
        family: str | None = None,
        config: str | Path | None = None,
        tags: Mapping[str, str] | None = None,
        base: str | None = None,
        relation: str = "finetune",
        description: str = "",
        allow_nonfinite: bool = False,
        progress: Progress | None = None,
    ) -> VersionInfo:
        return import_path(
            self.registry, Path(path), name, family=family, config_path=Path(config) if config else None,
            tags=dict(tags or {}), base=base, relation=relation, description=description,
            allow_nonfinite=allow_nonfinite, progress=progress,
        )

    def get(self, ref: str) -> VersionInfo:
        return self.registry.info(ref, include_deleted=True)

    def versions(self, model: str) -> list[VersionInfo]:
        return self.registry.versions(model)

    def list(self, filters: ListFilter | None = None) -> list[ModelSummary]:
        return queries.list_models(self.registry, filters)

    def find(self, sha_prefix: str) -> list[FindHit]:
        return queries.find(self.registry, sha_prefix)

    def stats(self) -> StoreStats:
        return queries.stats(self.registry)

    def load(self, ref: str, device: str = "cpu") -> LoadedModel:
        """The version as live torch objects (a diffusers pipeline, a transformers model, a Generator)."""
        info = self.registry.info(ref)
        return get_family(info.family).load(self.registry, info.ref, device)

    def sample(
        self, ref: str, seeds: Sequence[int], prompt: str | None = None, device: str = "cpu", **options: Any
    ) -> list[Sample]:
        """One sample per seed; seed s means the same latent for every version of a model."""
        model = self.load(ref, device)
        return get_family(model.family).sample(model, list(seeds), prompt, **options)

    def tensors(self, ref: str, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        return self.registry.load_tensors(ref, names)

    def commit(
        self,
        parent: str,
        changed: Mapping[str, torch.Tensor],
        method: str,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> VersionInfo:
        return self.registry.commit(parent, changed, method, params, metrics, **options)

    def edit(
        self,
        ref: str,
        method: str,
        request: Any,
        *,
        name: str | None = None,
        device: str = "cpu",
        progress: EditProgress | None = None,
    ) -> VersionInfo:
        """Edit `ref` with an editor plugin (uce, esd, memit, alphaedit, warp, ...) and register the child."""
        return apply_edit(self.registry, ref, method, request, name=name, device=device, progress=progress)

    def lineage(self, ref: str) -> Lineage:
        return lineage_queries.lineage(self.registry, ref)

    def diff(self, a: str, b: str) -> Diff:
        return lineage_queries.diff(self.registry, a, b)

    def export(self, ref: str, out: str | Path, progress: Progress | None = None) -> Path:
        return export_version(self.registry, ref, Path(out), progress)

    def verify(self, ref: str | None = None) -> VerifyReport:
        return integrity.verify(self.registry, ref)

    def gc(self, purge_deleted: bool = False, grace_s: float = integrity.DEFAULT_GRACE_S) -> GcReport:
        return integrity.gc(self.registry, purge_deleted, grace_s)

    def tag(self, ref: str, key: str, value: str) -> None:
        self.registry.tag(ref, key, value)

    def set_alias(self, ref: str, alias: str) -> VersionInfo:
        return self.registry.set_alias(ref, alias)

    def alias_history(self, model: str, alias: str) -> list[AliasEvent]:
        return self.registry.alias_history(model, alias)

    def delete(self, ref: str) -> VersionInfo:
        return self.registry.delete(ref)

    def restore(self, ref: str) -> VersionInfo:
        return self.registry.restore(ref)
