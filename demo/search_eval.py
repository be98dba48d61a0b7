"""Search on the shapes world: index its models with the shapes CLIP and measure retrieval with known truth.

Each GAN was trained on one slice (a colour and a shape), so for the text "a red circle", a freshly drawn
red circle, or a sketch of a circle, the right answer is known. Every slice is queried and the rank of
its GAN among all indexed models (GANs, the diffusion model, the LM) is recorded; as in Modelverse's
evaluation, top-1 and top-5 accuracy and mean average precision (with one relevant model per query,
AP = 1 / rank). A sketch has no colour, so for sketches every GAN of the sketched shape is relevant.

Measured on the full world: among the six GANs, text and image queries find the slice's GAN first for
every slice (top-1 1.00). Among all models, the diffusion model, trained on every slice and sampled
with every slice's caption, comes first for most text queries: a Gaussian fitted to its many-coloured
samples has wide tails along any colour direction, which the moment-generating score rewards (tau^2/2
q^T Sigma q). The slice's GAN is then second (top-5 1.00); image queries, scored by density, are not
fooled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelzoo import Zoo
from modelzoo.demo.shapes import BASIC_COLOURS, SHAPES, caption, draw, sample_specs, sketch
from modelzoo.registry.errors import NotFound
from modelzoo.search.engine import SearchHit
from modelzoo.search.indexer import IndexedVersion

GAN_SAMPLES = {"full": 128, "quick": 32}
DIFFUSION_SAMPLES = {"full": 96, "quick": 32}
DIFFUSION_STEPS = 20
LM_SAMPLES = {"full": 32, "quick": 8}
QUERY_RESOLUTION = 32


def encoder_spec(zoo: Zoo) -> str:
    versions = zoo.versions("shapes-clip")
    if not versions:
        raise NotFound("the shapes world has no shapes-clip; run `zoo demo` first")
    return f"zoo:{versions[-1].ref}"


def index_world(zoo: Zoo, refs_by_family: dict[str, list[str]], profile: str) -> list[IndexedVersion]:
    """Index the world's generators with the shapes CLIP (already indexed versions are skipped)."""
    encoder = encoder_spec(zoo)
    done: list[IndexedVersion] = []
    if refs_by_family.get("gan"):
        done += zoo.index(refs_by_family["gan"], encoder=encoder, samples=GAN_SAMPLES[profile], rank=16)
    if refs_by_family.get("diffusion"):
        prompts = [f"a {c} {s}" for c in BASIC_COLOURS for s in SHAPES]
        done += zoo.index(
            refs_by_family["diffusion"], encoder=encoder, samples=DIFFUSION_SAMPLES[profile], prompts=prompts,
            rank=16, options={"steps": DIFFUSION_STEPS},
        )
    if refs_by_family.get("lm"):
        done += zoo.index(refs_by_family["lm"], encoder=encoder, samples=LM_SAMPLES[profile], rank=8)
    return done


@dataclass
class RetrievalScores:
    ranks: list[int] = field(default_factory=list)

    def add(self, rank: int) -> None:
        self.ranks.append(rank)

    def summary(self) -> dict[str, float]:
        r = np.array(self.ranks, dtype=float)
        return {
            "queries": len(r), "top1": float(np.mean(r == 1)), "top5": float(np.mean(r <= 5)),
            "mAP": float(np.mean(1 / r)),
        }


def _rank(hits: Sequence[SearchHit], relevant: set[str], unranked: int) -> int:
    return next((hit.rank for hit in hits if hit.model in relevant), unranked)


def retrieval(
    zoo: Zoo,
    slices: Sequence[tuple[str, str]],
    seed: int = 0,
    queries_per_slice: int = 3,
    family: str | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 and mAP of text, image and sketch queries for every GAN slice, among the indexed
    models of `family` (all families when None)."""
    names = {s: f"shapes-gan-{s[0]}-{s[1]}" for s in slices}
    total = len(zoo.search(like=[names[slices[0]]], top_k=1000, family=family))
    results = {kind: RetrievalScores() for kind in ("text", "image", "sketch")}
    rng_seed = seed + 7919
    for colour, shape in slices:
        model = names[(colour, shape)]
        specs = sample_specs(queries_per_slice, rng_seed, shapes=[shape], colours=[colour])
        rng_seed += 1
        text_hits = zoo.search(text=[caption(specs[0])], top_k=total, family=family)
        results["text"].add(_rank(text_hits, {model}, total + 1))
        for spec in specs:
            image_hits = zoo.search(image=[draw(spec, QUERY_RESOLUTION)], top_k=total, family=family)
            results["image"].add(_rank(image_hits, {model}, total + 1))
            same_shape = {names[s] for s in slices if s[1] == shape}
            sketch_hits = zoo.search(sketch=[sketch(spec, QUERY_RESOLUTION)], top_k=total, family=family)
            results["sketch"].add(_rank(sketch_hits, same_shape, total + 1))
    return {"models_indexed": total, "slices": len(slices), **{k: v.summary() for k, v in results.items()}}
