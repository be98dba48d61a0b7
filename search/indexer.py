"""`zoo index`: sample each version through its family adapter, embed the samples, store their moments.

Per version and encoder, N samples (seeds first_seed, first_seed+1, ...; for prompted families the
prompts are dealt out round-robin over the seeds) are embedded and L2-normalised, and summarised by a
mixture of Gaussians (search/moments.py), each a mean and a covariance (top-r eigenpairs plus diagonal).
The components, at most `max_components` (`zoo index --components`, 1 for the paper's single Gaussian):
- a text-conditional model (diffusion, LM) sampled with two or more prompts, each with at least two
  samples: one component per prompt, weighted by its share of the samples, whatever `max_components`
  (above 1) says, since the prompts are the clusters the user asked for;
- otherwise (GANs, one prompt): K from 1 to `max_components` chosen by held-out likelihood over k-means
  clusterings (`fit_mixture`).
The mixture becomes one `embeddings` row, stored with the sample spec that made it and the modality
(images or texts). Indexing is incremental: a version that already has an embedding for this encoder and
this spec is skipped, so re-running `zoo index` after an import or an edit samples only the new
versions; `rebuild` samples it again and replaces the row (how a registry indexed before mixtures gets
them). The on-disk FAISS index is refreshed from the table afterwards (search/engine.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import Sample, contact_sheet, get_family
from modelzoo.registry.families.clip import ClipEncoder
from modelzoo.registry.placement import load_model
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.schema import Embedding, Model, Version
from modelzoo.registry.store import Registry
from modelzoo.search.moments import Mixture, Moments, fit_mixture, grouped_mixture, mixture_of

DEFAULT_SAMPLES = 256
DEFAULT_RANK = 16
DEFAULT_COMPONENTS = 8
SAMPLE_KIND = {"diffusion": "images", "gan": "images", "lm": "texts"}
"""Families that can be indexed and what their samples are; encoders (`clip`) are not searched."""
DEFAULT_PROMPTS = {
    "diffusion": (
        "a photo", "a painting", "a portrait of a person", "a landscape", "an animal", "a building",
        "a drawing", "an object on a table",
    ),
    "lm": ("The", "Once upon a time", "In my opinion", "Here is", "Today"),
}
"""Used when no prompts are given; a user indexing a specialised model should pass its own."""
THUMBNAIL_SAMPLES = 16

IndexProgress = Callable[[str, int, int], None]
"""Called with (version ref, samples done, samples in total for that version)."""


@dataclass(frozen=True)
class SampleSpec:
    """What was sampled: stored with the embedding so the moments can be reproduced and compared."""

    kind: str
    count: int
    first_seed: int = 0
    prompts: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "prompts": list(self.prompts)}

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def batches(self, batch_size: int) -> list[tuple[str | None, list[int]]]:
        """(prompt, seeds) groups: prompts dealt round-robin over the seeds, at most batch_size seeds each."""
        seeds = list(range(self.first_seed, self.first_seed + self.count))
        groups = [(p, seeds[i :: len(self.prompts)]) for i, p in enumerate(self.prompts)] or [(None, seeds)]
        return [(p, s[j : j + batch_size]) for p, s in groups for j in range(0, len(s), batch_size) if s[j:]]


def sample_spec(
    family: str,
    samples: int = DEFAULT_SAMPLES,
    prompts: Sequence[str] | None = None,
    first_seed: int = 0,
    options: dict[str, Any] | None = None,
) -> SampleSpec:
    if family not in SAMPLE_KIND:
        raise BadInput(f"{family} models cannot be indexed (indexable: {', '.join(SAMPLE_KIND)})")
    if samples < 2:
        raise BadInput(f"--samples must be at least 2 to estimate a covariance, got {samples}")
    if family == "gan":
        chosen: tuple[str, ...] = ()  # GANs sample from seeds alone; prompts given for others do not apply
    else:
        chosen = tuple(prompts) if prompts else DEFAULT_PROMPTS[family]
        if any(not p.strip() for p in chosen) and family == "diffusion":
            raise BadInput("diffusion prompts must not be empty")
    return SampleSpec(SAMPLE_KIND[family], samples, first_seed, chosen, dict(options or {}))


@dataclass(frozen=True)
class IndexedVersion:
    ref: str
    embedding_id: int
    samples: int
    seconds: float
    thumbnail: str
    skipped: bool
    components: int = 0


def indexable_versions(registry: Registry) -> list[VersionInfo]:
    """Every live version of a family that can be sampled (not the encoders themselves)."""
    with registry.db.read() as session:
        ids = session.scalars(
            select(Version.id).join(Model).where(Version.status == "ready", Model.family.in_(SAMPLE_KIND))
            .order_by(Version.id)
        ).all()
    return [registry.info_by_id(i) for i in ids]


def parent_specs(registry: Registry, version_id: int) -> list[tuple[str, str, SampleSpec, int, int]]:
    """(encoder id, encoder hash, sample spec, rank, components) of each embedding of a version: how to
    index its child (a parent with one component is indexed as one Gaussian, a mixture as the default)."""
    with registry.db.read() as session:
        rows = session.scalars(select(Embedding).where(Embedding.version_id == version_id)).all()
        return [
            (r.encoder_id, r.encoder_hash, SampleSpec(**{**r.sample_spec, "prompts": tuple(r.sample_spec["prompts"])}),
             r.rank, 1 if r.components == 1 else DEFAULT_COMPONENTS)
            for r in rows
        ]


def thumbnail_dir(registry: Registry) -> Path:
    return registry.settings.home / "search" / "thumbnails"


def embed_samples(encoder: ClipEncoder, samples: Sequence[Sample]) -> np.ndarray:
    if samples and samples[0].image is not None:
        return encoder.encode_images(np.stack([s.image for s in samples]))
    return encoder.encode_texts([s.text or "" for s in samples])


def _write_thumbnail(path: Path, samples: Sequence[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    shown = samples[:THUMBNAIL_SAMPLES]
    if shown[0].image is not None:
        contact_sheet([s.image for s in shown if s.image is not None]).save(partial, format="PNG")
    else:
        partial.write_text("\n---\n".join(s.text or "" for s in shown))
    partial.replace(path)


def existing_embedding(registry: Registry, version_id: int, encoder_hash: str, spec_hash: str) -> int | None:
    with registry.db.read() as session:
        return session.scalar(
            select(Embedding.id).where(
                Embedding.version_id == version_id,
                Embedding.encoder_hash == encoder_hash,
                Embedding.spec_hash == spec_hash,
            )
        )


def index_version(
    registry: Registry,
    encoder: ClipEncoder,
    info: VersionInfo,
    spec: SampleSpec,
    rank: int = DEFAULT_RANK,
    batch_size: int = 32,
    progress: IndexProgress | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    max_components: int = DEFAULT_COMPONENTS,
    rebuild: bool = False,
) -> IndexedVersion:
    """Sample, embed and store the moments of one version (skipped when already stored, unless `rebuild`);
    the version is sampled on `device` in `dtype` (None: as stored), the encoder runs as it was loaded."""
    if max_components < 1:
        raise BadInput(f"--components must be at least 1, got {max_components}")
    found = existing_embedding(registry, info.id, encoder.weights_hash, spec.hash)
    if found is not None and not rebuild:
        return IndexedVersion(info.ref, found, spec.count, 0.0, "", skipped=True)
    started = time.perf_counter()
    family = get_family(info.family)
    model = load_model(registry, info.ref, device, dtype)
    features: list[np.ndarray] = []
    groups: list[str] = []
    kept: list[Sample] = []
    done = 0
    call_options = dict(spec.options)
    if "batch_size" in inspect.signature(family.sample).parameters:
        call_options.setdefault("batch_size", batch_size)  # speed only: not part of the spec
    for prompt, seeds in spec.batches(batch_size):
        samples = family.sample(model, seeds, prompt, **call_options)
        features.append(embed_samples(encoder, samples))
        groups += [prompt or ""] * len(samples)
        if len(kept) < THUMBNAIL_SAMPLES:
            kept.extend(samples[: THUMBNAIL_SAMPLES - len(kept)])
        done += len(seeds)
        if progress:
            progress(info.ref, done, spec.count)
    mixture = summarise(np.concatenate(features), np.array(groups), rank, max_components)
    name = f"{info.id}-{encoder.weights_hash[:12]}-{spec.hash[:12]}.{'png' if spec.kind == 'images' else 'txt'}"
    thumbnail = thumbnail_dir(registry) / name
    _write_thumbnail(thumbnail, kept)
    seconds = time.perf_counter() - started
    embedding_id = store_embedding(registry, info.id, encoder, spec, mixture, str(thumbnail), seconds, replace=rebuild)
    return IndexedVersion(info.ref, embedding_id, spec.count, seconds, str(thumbnail), skipped=False,
                          components=mixture.components)


def summarise(features: np.ndarray, groups: np.ndarray, rank: int, max_components: int) -> Mixture:
    """The mixture rule of the module docstring: per prompt group, else K by held-out likelihood up to
    max_components."""
    labels, counts = np.unique(groups, return_counts=True)
    if max_components > 1 and len(labels) >= 2 and counts.min() >= 2:
        return grouped_mixture(features, groups, rank)
    return fit_mixture(features, rank, max_components)


def store_embedding(
    registry: Registry,
    version_id: int,
    encoder: ClipEncoder,
    spec: SampleSpec,
    moments: Mixture | Moments,
    thumbnail: str,
    seconds: float,
    replace: bool = False,
) -> int:
    """Store the row (a Gaussian as a one-component mixture); `replace`: in the same transaction, drop
    the version's embedding of this encoder and spec first."""
    mixture = moments if isinstance(moments, Mixture) else mixture_of([moments], [moments.count])
    row = Embedding(
        version_id=version_id, encoder_id=encoder.id, encoder_hash=encoder.weights_hash, spec_hash=spec.hash,
        sample_spec=spec.to_json(), count=mixture.count, dim=mixture.dim, rank=mixture.rank,
        mean=mixture.mean.astype("<f4").tobytes(), factor=mixture.factor.astype("<f2").tobytes(),
        diag=mixture.diag.astype("<f4").tobytes(), components=mixture.components,
        weights=None if mixture.components == 1 else mixture.weights.astype("<f4").tobytes(),
        modality=spec.kind, thumbnail=thumbnail, seconds=round(seconds, 3),
    )
    try:
        with registry.db.write() as session:
            if replace:
                session.execute(delete(Embedding).where(
                    Embedding.version_id == version_id, Embedding.encoder_hash == encoder.weights_hash,
                    Embedding.spec_hash == spec.hash,
                ))
            session.add(row)
            session.flush()
            return int(row.id)
    except IntegrityError:  # another process indexed the same version with the same encoder and spec
        found = existing_embedding(registry, version_id, encoder.weights_hash, spec.hash)
        if found is None:
            raise
        return found


def decode_mixture(row: Embedding) -> Mixture:
    K = row.components
    mean = np.frombuffer(row.mean, "<f4").astype(np.float32).reshape(K, row.dim)
    factor = np.frombuffer(row.factor, "<f2").astype(np.float32).reshape(K, row.dim, row.rank)
    diag = np.frombuffer(row.diag, "<f4").astype(np.float32).reshape(K, row.dim)
    weights = np.ones(1, np.float32) if row.weights is None else np.frombuffer(row.weights, "<f4").astype(np.float32)
    return Mixture(weights, mean, factor, diag, row.count)


def decode_moments(row: Embedding) -> Moments:
    """The row's single Gaussian (its mixture collapsed by moment matching)."""
    return decode_mixture(row).collapsed()
