"""Content-based search: encode the query, take candidates from FAISS, rerank them exactly by moments.

A query is any mix of texts, images, sketches and models ("like REF"); each part scores every candidate
on a log scale (search/moments.py) and the parts add up, so "a red circle" plus a photo ranks models by
how well they explain both. Metadata filters (family, tags) restrict the candidates inside FAISS.

Models are ranked within one modality, the kind of samples their embeddings hold: CLIP's image and text
features sit in different regions (the modality gap), so a text query scored against an LM's text
samples and against a GAN's image samples gives numbers that cannot be compared. Image and sketch
queries, and text queries (read as captions of images), rank image generators; language models are
ranked under `modality="text"` or `family="lm"`; a query made only of models takes their modality.

Each model is a mixture of Gaussians (`summary="mixture"`, the default) or, for comparison with the
paper, the single Gaussian with the same mean and covariance (`summary="gaussian"`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from sqlalchemy import and_, exists, func, or_, select

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.clip import ClipEncoder
from modelzoo.registry.files import NotRegular, open_regular
from modelzoo.registry.refs import resolve
from modelzoo.registry.schema import Embedding, Model, Tag, Version
from modelzoo.registry.store import Registry
from modelzoo.search.index import Fingerprint, MomentIndex, open_index, search_vector, write_index
from modelzoo.search.indexer import SAMPLE_KIND, decode_mixture
from modelzoo.search.moments import (
    Mixture,
    MixtureBatch,
    density_scores,
    frechet_distances,
    matched_frechet,
    mixture_density_scores,
    mixture_text_scores,
    text_scores,
)

MIN_CANDIDATES = 400
CANDIDATES_PER_ROOT = 0.75


def default_pool(components: int) -> int:
    """Components reranked exactly per query part (each candidate version with all of its components) in an
    index of `components`: CANDIDATES_PER_ROOT sqrt(components), at least MIN_CANDIDATES. A text score
    rewards variance too, and FAISS orders candidates by the mean variance tr(Sigma)/d, so recall needs a
    deeper rerank as the neighbourhood of a query grows crowded (more probed lists did not help: nprobe 96
    gave what 24 gave). Chosen with benchmarks/search.py --seed 1 (1 thread, mixtures of K up to 8): text
    recall@10 was 1.0 at 400 among 450,000 components (10^5 models, d 512, r 8) and at 4.5 million (10^6
    models, d 128, r 4) 0.83 at 400, 0.92 at 800 and 0.96 at 1600, where 0.75 sqrt(N) gives 1591."""
    return max(MIN_CANDIDATES, round(CANDIDATES_PER_ROOT * math.sqrt(components)))


MODALITIES = ("images", "texts")
"""As stored (the sample kind); users say `image` or `text`, and hits say so too."""
MODALITY_NAMES = {"image": "images", "images": "images", "text": "texts", "texts": "texts"}
SUMMARIES = ("mixture", "gaussian")


@dataclass(frozen=True)
class SearchQuery:
    """Texts, images, sketches (uint8 HxWx3 arrays) and model refs; at least one of them."""

    texts: tuple[str, ...] = ()
    images: tuple[np.ndarray, ...] = ()
    sketches: tuple[np.ndarray, ...] = ()
    like: tuple[str, ...] = ()

    def parts(self) -> int:
        return len(self.texts) + len(self.images) + len(self.sketches) + len(self.like)


@dataclass(frozen=True)
class SearchFilter:
    family: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    modality: str | None = None  # images | texts; None: chosen from the family and the query


@dataclass(frozen=True)
class SearchHit:
    rank: int
    ref: str
    model: str
    version: int
    family: str
    score: float
    scores: dict[str, float]
    thumbnail: str
    embedding_id: int
    modality: str


@dataclass(frozen=True)
class IndexedEncoder:
    encoder_id: str
    encoder_hash: str
    versions: int


def read_image(path: str | Path) -> np.ndarray:
    """A query image as RGB. Pillow's decompression-bomb warning (an image of more pixels than it allows
    without a second look) is an error here: a query never needs more, and decoding one costs gigabytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(Path(path)) as fd, open(fd, "rb", closefd=False) as f, Image.open(f) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise BadInput(f"image {path} does not exist") from None
    except NotRegular as e:
        raise BadInput(str(e)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(f"image {path} is too large to search with ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadInput(f"cannot read image {path}: {e}") from None


def indexed_encoders(registry: Registry) -> list[IndexedEncoder]:
    with registry.db.read() as session:
        rows = session.execute(
            select(Embedding.encoder_id, Embedding.encoder_hash, func.count(func.distinct(Embedding.version_id)))
            .group_by(Embedding.encoder_id, Embedding.encoder_hash)
            .order_by(Embedding.encoder_id)
        ).all()
    return [IndexedEncoder(e, h, int(n)) for e, h, n in rows]


def index_dir(registry: Registry, encoder_hash: str, modality: str) -> Path:
    return registry.settings.home / "search" / f"{encoder_hash[:16]}-{modality}"


def fingerprint(registry: Registry, encoder_hash: str, modality: str) -> Fingerprint:
    with registry.db.read() as session:
        count, max_id, id_sum = session.execute(
            select(func.count(Embedding.id), func.max(Embedding.id), func.sum(Embedding.id)).where(
                Embedding.encoder_hash == encoder_hash, Embedding.modality == modality
            )
        ).one()
    return Fingerprint(int(count), int(max_id or 0), int(id_sum or 0))


def current_index(registry: Registry, encoder_hash: str, modality: str) -> MomentIndex | None:
    """The on-disk index for this encoder and modality if it matches the database, else one rebuilt from
    it; None when no version of that modality is indexed."""
    expected = fingerprint(registry, encoder_hash, modality)
    if expected.count == 0:
        return None
    found = open_index(index_dir(registry, encoder_hash, modality), encoder_hash, modality)
    if found is not None and found.fingerprint == expected:
        return found
    return rebuild_index(registry, encoder_hash, modality, expected)


def refresh_indexes(registry: Registry, encoder_hash: str) -> None:
    for modality in MODALITIES:
        current_index(registry, encoder_hash, modality)


def rebuild_index(registry: Registry, encoder_hash: str, modality: str, expected: Fingerprint) -> MomentIndex:
    with registry.db.read() as session:
        rows = session.scalars(
            select(Embedding).where(Embedding.encoder_hash == encoder_hash, Embedding.modality == modality)
            .order_by(Embedding.id)
        ).all()
        mixtures = [decode_mixture(r) for r in rows]
        ids = np.array([r.id for r in rows], dtype=np.int64)
    batch = MixtureBatch.of(mixtures)
    starts = np.concatenate([[0], np.cumsum([m.components for m in mixtures])])
    c = batch.components
    assert c.samples is not None  # MixtureBatch.of counts each component's samples
    return write_index(
        index_dir(registry, encoder_hash, modality), encoder_hash, modality, expected, ids, starts,
        batch.log_weights.numpy(), c.mean.numpy(), c.factor.numpy(), c.diag.numpy(), c.samples.numpy(),
    )


def _allowed_ids(registry: Registry, encoder_hash: str, filters: SearchFilter) -> np.ndarray:
    """Embedding ids of live versions that pass the filters."""
    statement = (
        select(Embedding.id)
        .join(Version, Version.id == Embedding.version_id)
        .join(Model, Model.id == Version.model_id)
        .where(Embedding.encoder_hash == encoder_hash, Version.status == "ready")
    )
    if filters.family:
        statement = statement.where(Model.family == filters.family)
    for key, value in filters.tags.items():
        tagged = and_(
            Tag.model_id == Model.id, Tag.key == key, Tag.value == value,
            or_(Tag.version_id.is_(None), Tag.version_id == Version.id),
        )
        statement = statement.where(exists().where(tagged))
    with registry.db.read() as session:
        return np.array(sorted(session.scalars(statement)), dtype=np.int64)


def _model_embedding(registry: Registry, ref: str, encoder_hash: str) -> tuple[str, Mixture]:
    """(modality, mixture) of the version's latest embedding with this encoder."""
    with registry.db.read() as session:
        version = resolve(session, ref)
        row = session.scalars(
            select(Embedding)
            .where(Embedding.version_id == version.id, Embedding.encoder_hash == encoder_hash)
            .order_by(Embedding.id.desc())
        ).first()
        if row is None:
            raise BadInput(f"{ref} is not indexed with this encoder; run `zoo index {ref}` first")
        return row.modality, decode_mixture(row)


def choose_modality(registry: Registry, query: SearchQuery, filters: SearchFilter, encoder_hash: str) -> str:
    """The modality to rank in: as asked; else a query made only of models takes the first model's; else
    texts for `family="lm"`; else images (texts read as captions)."""
    if filters.modality is not None:
        if filters.modality not in MODALITY_NAMES:
            raise BadInput(f"unknown modality {filters.modality!r}; use image or text")
        return MODALITY_NAMES[filters.modality]
    if query.like and not (query.texts or query.images or query.sketches):
        return _model_embedding(registry, query.like[0], encoder_hash)[0]
    return SAMPLE_KIND.get(filters.family or "", "images")


@dataclass(frozen=True)
class QueryPart:
    name: str
    vector: np.ndarray  # what FAISS searches with: a feature, or a model's normalised mean
    kind: str  # text | sketch | image | model
    mixture: Mixture | None = None


SIMILARITY_KINDS = ("text", "sketch")
"""Query parts scored by the moment-generating score log E[exp(tau q.x)], a soft maximum of the query's
similarity to the model's samples: a caption or a sketch describes what the samples look like without
being one of them. The log-density asks whether the model could have drawn the query itself, which for a
sketch (an outline on white, far from every model's samples) ranks models by their breadth: on the full
shapes world the density put the sketch's GANs in the top 5 for 0.89 of sketches, the similarity for all."""


def _encode(
    registry: Registry, query: SearchQuery, encoder: ClipEncoder | None, encoder_hash: str, modality: str
) -> list[QueryPart]:
    if any(not t.strip() for t in query.texts):
        raise BadInput("empty text query")
    needs_encoder = query.texts or query.images or query.sketches
    if needs_encoder and encoder is None:
        raise BadInput("text and image queries need an encoder")
    parts: list[QueryPart] = []
    if query.texts:
        assert encoder is not None
        for text, feature in zip(query.texts, encoder.encode_texts(list(query.texts)), strict=True):
            parts.append(QueryPart(f"text:{text}", feature, "text"))
    for label, images in (("image", query.images), ("sketch", query.sketches)):
        if images:
            assert encoder is not None
            for i, feature in enumerate(encoder.encode_images(np.stack([_same_size(im, images[0]) for im in images]))):
                parts.append(QueryPart(f"{label}:{i}", feature, label))
    for ref in query.like:
        found, mixture = _model_embedding(registry, ref, encoder_hash)
        if found != modality:
            raise BadInput(
                f"{ref} is indexed from its {found}, the search ranks models by their {modality}; "
                f"choose --modality {found.removesuffix('s')}"
            )
        mean = mixture.collapsed().mean
        parts.append(QueryPart(f"like:{ref}", mean / max(np.linalg.norm(mean), 1e-12), "model", mixture))
    return parts


def _same_size(image: np.ndarray, first: np.ndarray) -> np.ndarray:
    if image.shape == first.shape:
        return image
    return np.asarray(Image.fromarray(image).resize((first.shape[1], first.shape[0]), Image.BICUBIC))


def score_parts(
    parts: Sequence[QueryPart], batch: MixtureBatch, tau: float, summary: str = "mixture"
) -> dict[str, np.ndarray]:
    scores: dict[str, np.ndarray] = {}
    if summary == "gaussian":
        single = batch.collapsed()
        for part in parts:
            if part.kind in SIMILARITY_KINDS:
                scores[part.name] = text_scores(single, part.vector, tau)
            elif part.kind == "image":
                scores[part.name] = density_scores(single, part.vector)
            else:
                assert part.mixture is not None
                scores[part.name] = -frechet_distances(part.mixture.collapsed(), single)
        return scores
    for part in parts:
        if part.kind in SIMILARITY_KINDS:
            scores[part.name] = mixture_text_scores(batch, part.vector, tau)
        elif part.kind == "image":
            scores[part.name] = mixture_density_scores(batch, part.vector)
        else:
            assert part.mixture is not None
            scores[part.name] = -matched_frechet(part.mixture, batch)
    return scores


def search(
    registry: Registry,
    query: SearchQuery,
    encoder_hash: str,
    encoder: ClipEncoder | None = None,
    top_k: int = 10,
    filters: SearchFilter | None = None,
    candidates: int | None = None,
    tau: float | None = None,
    summary: str = "mixture",
) -> list[SearchHit]:
    """The `top_k` live versions best matching `query`, best first, among the versions of one modality;
    `candidates` components are reranked (default: `default_pool` of the index's size)."""
    if top_k < 1:
        raise BadInput(f"--top-k must be at least 1, got {top_k}")
    if summary not in SUMMARIES:
        raise BadInput(f"unknown summary {summary!r}; use {' or '.join(SUMMARIES)}")
    filters = filters or SearchFilter()
    if query.parts() == 0:
        raise BadInput("empty query: give --text, --image, --sketch or --like")
    modality = choose_modality(registry, query, filters, encoder_hash)
    parts = _encode(registry, query, encoder, encoder_hash, modality)
    index = current_index(registry, encoder_hash, modality)
    if index is None:
        return []
    allowed = None
    if filters.family or filters.tags:
        allowed = index.positions_of(_allowed_ids(registry, encoder_hash, filters))
    pool = max(candidates if candidates is not None else default_pool(len(index.means)), 4 * top_k)
    scale = tau if tau is not None else (encoder.logit_scale if encoder is not None else 100.0)
    ranking = rank_candidates(index, parts, pool, scale, allowed, summary)
    return _hits(registry, ranking, top_k, modality)


@dataclass(frozen=True)
class Ranking:
    """Candidates at index row `positions`, their total and per-part scores, and the best-first `order`."""

    positions: np.ndarray
    total: np.ndarray
    per_part: dict[str, np.ndarray]
    order: np.ndarray
    embedding_ids: np.ndarray


def rank_candidates(
    index: MomentIndex,
    parts: Sequence[QueryPart],
    pool: int,
    tau: float,
    allowed: np.ndarray | None = None,
    summary: str = "mixture",
) -> Ranking:
    """FAISS candidates for every part, reranked exactly by the sum of the parts' moment scores."""
    vectors = [search_vector(p.vector, tau if p.kind in SIMILARITY_KINDS else None) for p in parts]
    positions = index.candidates(np.stack(vectors), pool, allowed)
    if len(positions) == 0:
        empty = np.zeros(0)
        return Ranking(positions, empty, {}, positions, positions)
    per_part = score_parts(parts, index.moments(positions), tau, summary)
    total = np.sum(list(per_part.values()), axis=0)
    return Ranking(positions, total, per_part, np.argsort(-total, kind="stable"), index.rows[positions])


def _hits(registry: Registry, ranking: Ranking, top_k: int, modality: str) -> list[SearchHit]:
    embedding_ids, total, order = ranking.embedding_ids, ranking.total, ranking.order
    wanted = [int(i) for i in embedding_ids]
    with registry.db.read() as session:
        rows = session.execute(
            select(Embedding.id, Embedding.version_id, Embedding.thumbnail, Version.number, Version.status,
                   Model.name, Model.family)
            .join(Version, Version.id == Embedding.version_id)
            .join(Model, Model.id == Version.model_id)
            .where(Embedding.id.in_(wanted))
        ).all()
    by_id = {r.id: r for r in rows}
    hits: list[SearchHit] = []
    seen: set[int] = set()
    for i in order:
        row = by_id.get(int(embedding_ids[i]))
        if row is None or row.status != "ready" or row.version_id in seen:
            continue  # deleted since indexing, or a second embedding of a version already listed
        seen.add(row.version_id)
        hits.append(SearchHit(
            rank=len(hits) + 1, ref=f"{row.name}@{row.number}", model=row.name, version=row.number,
            family=row.family, score=float(total[i]), scores={k: float(v[i]) for k, v in ranking.per_part.items()},
            thumbnail=row.thumbnail, embedding_id=row.id, modality=modality.removesuffix("s"),
        ))
        if len(hits) == top_k:
            break
    return hits


def search_encoder(
    registry: Registry, spec: str | None, needs_model: bool, device: str = "cpu"
) -> tuple[str, ClipEncoder | None]:
    """The encoder hash to search under and, when text or images must be encoded, the encoder itself.

    Without a spec the one encoder the registry is indexed with is used; an encoder whose weights no
    longer match the stored hash is refused (its features would not be comparable)."""
    from modelzoo.search.embedders import load_embedder  # noqa: PLC0415 (open_clip is heavy)

    indexed = indexed_encoders(registry)
    listing = ", ".join(f"{e.encoder_id} ({e.versions} versions)" for e in indexed) or "none"
    if spec is not None:
        encoder = load_embedder(spec, registry, device)
        if not any(e.encoder_hash == encoder.weights_hash for e in indexed):
            raise BadInput(
                f"no version is indexed with encoder {spec} (weights {encoder.weights_hash[:12]}); indexed: "
                f"{listing}; run `zoo index --encoder {spec}`"
            )
        return encoder.weights_hash, encoder
    hashes = {e.encoder_hash for e in indexed}
    if not hashes:
        raise BadInput("nothing is indexed yet; run `zoo index --encoder SPEC` first")
    if len(hashes) > 1:
        raise BadInput(f"versions are indexed with several encoders ({listing}); choose one with --encoder")
    chosen = indexed[0]
    if not needs_model:
        return chosen.encoder_hash, None
    encoder = load_embedder(chosen.encoder_id, registry, device)
    if encoder.weights_hash != chosen.encoder_hash:
        raise BadInput(
            f"encoder {chosen.encoder_id} has other weights than when the index was built; "
            f"re-run `zoo index --encoder {chosen.encoder_id}`"
        )
    return chosen.encoder_hash, encoder
