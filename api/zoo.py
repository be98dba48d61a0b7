"""The public Python API. The CLI is a thin layer over exactly these calls."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelzoo.analyses.base import AnalysisProgress, run_analysis
from modelzoo.editors.ablate import Knockout, knock_out
from modelzoo.editors.apply import apply_edit
from modelzoo.editors.base import EditProgress
from modelzoo.editors.compose import compose as compose_versions
from modelzoo.editors.fv import FvBake, bake_function_vector
from modelzoo.registry import analyses, integrity, queries
from modelzoo.registry import lineage as lineage_queries
from modelzoo.registry.errors import BadInput, ZooError
from modelzoo.registry.exporter import export_version
from modelzoo.registry.families.base import LoadedModel, Sample, get_family
from modelzoo.registry.importer import import_path
from modelzoo.registry.placement import load_model, resolve_device
from modelzoo.registry.queries import ListFilter
from modelzoo.registry.records import (
    AliasEvent,
    AnalysisInfo,
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
from modelzoo.search.embedders import DEFAULT_ENCODER, load_embedder
from modelzoo.search.engine import (
    SearchFilter,
    SearchHit,
    SearchQuery,
    indexed_encoders,
    read_image,
    refresh_indexes,
    search_encoder,
)
from modelzoo.search.engine import search as search_versions
from modelzoo.search.indexer import (
    DEFAULT_COMPONENTS,
    DEFAULT_RANK,
    DEFAULT_SAMPLES,
    IndexedVersion,
    IndexProgress,
    index_version,
    indexable_versions,
    parent_specs,
    sample_spec,
)

log = logging.getLogger(__name__)


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
        relation: str | None = None,
        description: str = "",
        allow_nonfinite: bool = False,
        follow_symlinks: bool = False,
        progress: Progress | None = None,
    ) -> VersionInfo:
        """Import a folder or file. Only files inside a folder are read: a link out of it is refused
        unless `follow_symlinks` (the user vouches for the linked files)."""
        return import_path(
            self.registry, Path(path), name, family=family, config_path=Path(config) if config else None,
            tags=dict(tags or {}), base=base, relation=relation, description=description,
            allow_nonfinite=allow_nonfinite, follow_symlinks=follow_symlinks, progress=progress,
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

    def load(self, ref: str, device: str = "cpu", dtype: str | None = None) -> LoadedModel:
        """The version as live torch objects (a diffusers pipeline, a transformers model, a Generator) on
        `device` ("auto": CUDA when present) in `dtype` ("bfloat16", ...; None keeps the stored dtype)."""
        return load_model(self.registry, ref, device, dtype)

    def sample(
        self, ref: str, seeds: Sequence[int], prompt: str | None = None, device: str = "cpu",
        dtype: str | None = None, **options: Any,
    ) -> list[Sample]:
        """One sample per seed; seed s means the same latent for every version of a model."""
        model = self.load(ref, device, dtype)
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
        dtype: str | None = None,
        progress: EditProgress | None = None,
    ) -> VersionInfo:
        """Edit `ref` with an editor plugin (uce, esd, memit, alphaedit, warp, ...) and register the child.
        The edit runs on `device` in `dtype` (see `load`); the child's tensors keep the parent's dtypes."""
        device = resolve_device(device)
        child = apply_edit(self.registry, ref, method, request, name=name, device=device, dtype=dtype,
                           progress=progress)
        self._index_like_parent(ref, child, device)
        return child

    def analyze(self, ref: str, kind: str, request: Any, *, device: str = "cpu",
                progress: AnalysisProgress | None = None) -> AnalysisInfo:
        """Run an analysis plugin (lre, fv, ...) on `ref` and store its result with the version."""
        return run_analysis(self.registry, ref, kind, request, device=device, progress=progress)

    def analyses(self, ref: str, kind: str | None = None) -> list[AnalysisInfo]:
        return analyses.list_analyses(self.registry, ref, kind)

    def analysis(self, analysis_id: int) -> AnalysisInfo:
        return analyses.get_analysis(self.registry, analysis_id)

    def analysis_tensors(self, analysis_id: int) -> dict[str, torch.Tensor]:
        return analyses.analysis_tensors(self.registry, analysis_id)

    def apply_function_vector(self, ref: str, bake: FvBake, name: str | None = None) -> VersionInfo:
        """Register a child of `ref` whose weights add a stored function vector (`zoo edit fv`)."""
        return bake_function_vector(self.registry, ref, bake, name)

    def knock_out(self, ref: str, request: Knockout, name: str | None = None) -> VersionInfo:
        """Register a child of `ref` with a stored circuit knocked out (`zoo edit ablate`)."""
        return knock_out(self.registry, ref, request, name)

    def _index_like_parent(self, parent: str, child: VersionInfo, device: str) -> None:
        """An edit of an indexed version is indexed the same way, so search sees it at once. The edit is
        already registered: a failure here is reported, not raised."""
        for encoder_id, encoder_hash, spec, rank, components in parent_specs(
            self.registry, self.registry.info(parent).id
        ):
            try:
                encoder = load_embedder(encoder_id, self.registry, device)
                if encoder.weights_hash == encoder_hash:
                    index_version(self.registry, encoder, child, spec, rank, device=device, max_components=components)
                else:
                    log.warning("not indexing %s: encoder %s has changed", child.ref, encoder_id)
            except ZooError as error:
                log.warning("could not index %s with %s: %s", child.ref, encoder_id, error)

    def index(
        self,
        refs: Sequence[str] | None = None,
        *,
        encoder: str | None = None,
        samples: int = DEFAULT_SAMPLES,
        prompts: Sequence[str] | None = None,
        rank: int = DEFAULT_RANK,
        first_seed: int = 0,
        options: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        dtype: str | None = None,
        progress: IndexProgress | None = None,
        components: int = DEFAULT_COMPONENTS,
        rebuild: bool = False,
    ) -> list[IndexedVersion]:
        """Sample, embed and store moments for `refs` (default: every live diffusion, GAN and LM version)
        that are not yet indexed with this encoder and sample spec, then refresh the search index.

        `encoder` defaults to the one the registry is already indexed with, else DEFAULT_ENCODER.
        `components` bounds the mixture (1: one Gaussian); `rebuild` samples again every version already
        indexed with this encoder, with the sample spec and rank it was indexed with, and replaces its
        moments (how embeddings from before mixtures are upgraded)."""
        if rank < 0:
            raise BadInput(f"--rank must be >= 0, got {rank}")
        if components < 1:
            raise BadInput(f"--components must be at least 1, got {components}")
        if encoder is None:
            known = {e.encoder_id for e in indexed_encoders(self.registry)}
            encoder = known.pop() if len(known) == 1 else DEFAULT_ENCODER
        device = resolve_device(device)
        clip = load_embedder(encoder, self.registry, device)
        targets = [self.registry.info(r) for r in refs] if refs else indexable_versions(self.registry)
        jobs = []
        for info in targets:
            stored = [(s, r) for _, h, s, r, _ in parent_specs(self.registry, info.id) if h == clip.weights_hash]
            if rebuild and stored:
                jobs += [(info, spec, stored_rank) for spec, stored_rank in stored]
            else:
                jobs.append((info, sample_spec(info.family, samples, prompts, first_seed, dict(options or {})), rank))
        done = [
            index_version(self.registry, clip, info, spec, job_rank, batch_size, progress, device, dtype, components,
                          rebuild)
            for info, spec, job_rank in jobs
        ]
        if done:
            refresh_indexes(self.registry, clip.weights_hash)
        return done

    def search(
        self,
        *,
        text: Sequence[str] = (),
        image: Sequence[str | Path | np.ndarray] = (),
        sketch: Sequence[str | Path | np.ndarray] = (),
        like: Sequence[str] = (),
        top_k: int = 10,
        family: str | None = None,
        tags: Mapping[str, str] | None = None,
        encoder: str | None = None,
        candidates: int | None = None,
        device: str = "cpu",
        modality: str | None = None,
        summary: str = "mixture",
    ) -> list[SearchHit]:
        """Versions ranked by how well their samples match the query (any mix of parts), best first, among
        the versions of one modality (`images` or `texts`; by default images, texts for `family="lm"`);
        `summary="gaussian"` scores each version's single Gaussian instead of its mixture."""
        as_array = lambda x: x if isinstance(x, np.ndarray) else read_image(x)  # noqa: E731
        query = SearchQuery(tuple(text), tuple(map(as_array, image)), tuple(map(as_array, sketch)), tuple(like))
        if query.parts() == 0:
            raise BadInput("empty query: give --text, --image, --sketch or --like")
        needs_model = bool(query.texts or query.images or query.sketches)
        encoder_hash, clip = search_encoder(self.registry, encoder, needs_model, device)
        filters = SearchFilter(family, dict(tags or {}), modality)
        return search_versions(self.registry, query, encoder_hash, clip, top_k, filters, candidates, summary=summary)

    def compose(
        self, refs: Sequence[str], name: str | None = None, scales: Sequence[float] | None = None
    ) -> VersionInfo:
        """W_parent + sum_k s_k (W_k - W_parent) over edits of one parent, registered with all of them as
        parents (the GAN-warping paper composes edited models this way)."""
        return compose_versions(self.registry, refs, name=name, scales=scales)

    def lineage(self, ref: str) -> Lineage:
        return lineage_queries.lineage(self.registry, ref)

    def diff(self, a: str, b: str) -> Diff:
        return lineage_queries.diff(self.registry, a, b)

    def export(self, ref: str, out: str | Path, progress: Progress | None = None, format: str = "native") -> Path:
        """Write a version as its library's folder ("native"), a factored child as a LoRA adapter of its
        parent ("lora"), or a diffusion pipeline as one original-layout safetensors file ("single-file")."""
        return export_version(self.registry, ref, Path(out), progress, format)

    def verify(self, ref: str | None = None) -> VerifyReport:
        return integrity.verify(self.registry, ref)

    def gc(self, purge_deleted: bool = False, grace_s: float = integrity.DEFAULT_GRACE_S,
           drop_derived: bool = False) -> GcReport:
        return integrity.gc(self.registry, purge_deleted, grace_s, drop_derived)

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
