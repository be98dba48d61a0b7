"""Search on the shapes world: index its models with the shapes CLIP and measure retrieval with known truth.

Each GAN was trained on one slice (a colour and a shape), so for the text "a red circle", a freshly drawn
red circle, or a sketch of a circle, the right answer is known. Every slice is queried and the rank of
its GAN among the indexed image models (GANs and the diffusion model; language models are ranked apart)
is recorded; as in Modelverse's evaluation, top-1 and top-5 accuracy and mean average precision (with one
relevant model per query, AP = 1 / rank). A sketch has no colour, so for sketches every GAN of the
sketched shape is relevant. Image queries are drawn as the world draws them (on mid grey) and on
backgrounds the world's generators never show (white, black, a checkerboard), to see how far the search
depends on the world's style rather than on shape and colour.

The diffusion model, trained on every slice and indexed with every slice's caption, is the hard case: a
single Gaussian fitted to its many-coloured samples has a wide variance along any colour direction, which
the moment-generating text score rewards (tau^2/2 q^T Sigma q), so it outranks the slice's GAN; as a
mixture with one component per caption it scores about log(1/its share of that caption) lower.
`retrieval(..., summary=)` measures either summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelzoo import Zoo
from modelzoo.demo.shapes import BASIC_COLOURS, SHAPES, backdrop, caption, draw, sample_specs, sketch
from modelzoo.registry.errors import NotFound
from modelzoo.search.engine import SearchHit
from modelzoo.search.indexer import IndexedVersion

GAN_SAMPLES = {"full": 128, "quick": 32}
DIFFUSION_SAMPLES = {"full": 512, "quick": 32}
"""The full world's 16 captions get 32 samples each: from 6 a caption, each component's Gaussian tail
inflated its text score above the GAN of that caption."""
DIFFUSION_STEPS = 20
LM_SAMPLES = {"full": 32, "quick": 8}
QUERY_RESOLUTION = 32
QUERY_BACKDROPS = ("white", "black", "checkerboard")
"""Backgrounds of the image queries besides the world's grey: white and black are among the styles the
shapes CLIP trains on (demo/train_clip.py), the checkerboard is one it never sees; no generator draws on
any of them."""


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
    summary: str = "mixture",
) -> dict[str, Any]:
    """Top-1, top-5 and mAP of text, image and sketch queries for every GAN slice, among the indexed
    image models of `family` (all image families when None), each version summarised by its mixture or
    by its single Gaussian (`summary`). Image queries are drawn as the world draws them ("image") and on
    the `QUERY_BACKDROPS` ("image:white", ...)."""
    names = {s: f"shapes-gan-{s[0]}-{s[1]}" for s in slices}
    total = len(zoo.search(like=[names[slices[0]]], top_k=1000, family=family))
    search = lambda **query: zoo.search(top_k=total, family=family, summary=summary, **query)  # noqa: E731
    kinds = ("text", "image", *(f"image:{b}" for b in QUERY_BACKDROPS), "sketch")
    results = {kind: RetrievalScores() for kind in kinds}
    rng_seed = seed + 7919
    for colour, shape in slices:
        model = names[(colour, shape)]
        specs = sample_specs(queries_per_slice, rng_seed, shapes=[shape], colours=[colour])
        rng_seed += 1
        results["text"].add(_rank(search(text=[caption(specs[0])]), {model}, total + 1))
        for spec in specs:
            results["image"].add(_rank(search(image=[draw(spec, QUERY_RESOLUTION)]), {model}, total + 1))
            for style in QUERY_BACKDROPS:
                hits = search(image=[draw(spec, QUERY_RESOLUTION, backdrop(style, QUERY_RESOLUTION))])
                results[f"image:{style}"].add(_rank(hits, {model}, total + 1))
            same_shape = {names[s] for s in slices if s[1] == shape}
            sketch_hits = search(sketch=[sketch(spec, QUERY_RESOLUTION)])
            results["sketch"].add(_rank(sketch_hits, same_shape, total + 1))
    return {"models_indexed": total, "slices": len(slices), "summary": summary,
            **{k: v.summary() for k, v in results.items()}}
