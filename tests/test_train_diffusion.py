"""The shapes-world diffusion trainer: a quick model that follows colour prompts, saved as a standard pipeline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from modelzoo.demo.meters import colours_of
from modelzoo.demo.shapes import BASIC_COLOURS, SHAPES, dataset
from modelzoo.demo.train_diffusion import PROFILES, TrainProfile, train_diffusion, train_pipeline
from modelzoo.registry.errors import BadInput

QUICK_COLOUR_AGREEMENT = 0.5
"""Measured: the quick profile reaches 0.75-1.0 on seeds 0-2; chance is 0.25."""


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float], list[tuple[int, int, float]]]:
    out_dir = tmp_path_factory.mktemp("diffusion") / "shapes-sd"
    calls: list[tuple[int, int, float]] = []
    metrics = train_diffusion(out_dir, seed=0, profile="quick", progress=lambda *call: calls.append(call))
    return out_dir, metrics, calls


def test_quick_model_follows_colour_prompts_well_above_chance(quick: tuple[Path, dict, list]) -> None:
    _, metrics, _ = quick
    assert metrics["colour_agreement"] >= QUICK_COLOUR_AGREEMENT
    assert metrics["samples"] == len(BASIC_COLOURS) * len(SHAPES) * PROFILES["quick"].samples_per_prompt
    assert metrics["unet_steps"] == PROFILES["quick"].unet_steps


def test_progress_reports_every_step_with_a_finite_loss(quick: tuple[Path, dict, list]) -> None:
    _, metrics, calls = quick
    steps = PROFILES["quick"].unet_steps
    assert [(step, total) for step, total, _ in calls] == [(step, steps) for step in range(steps)]
    assert all(np.isfinite(loss) for _, _, loss in calls)
    assert calls[-1][2] < calls[0][2]


def test_saved_folder_loads_as_a_diffusion_pipeline_and_samples_with_defaults(quick: tuple[Path, dict, list]) -> None:
    out_dir, _, _ = quick
    pipe = DiffusionPipeline.from_pretrained(out_dir)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a {colour} circle" for colour in BASIC_COLOURS]
    images = pipe(prompts, generator=torch.Generator().manual_seed(1), output_type="np").images
    size = PROFILES["quick"].resolution
    assert images.shape == (len(prompts), size, size, 3)
    read = colours_of((images * 255).round().astype(np.uint8))
    assert sum(r == c for r, c in zip(read, BASIC_COLOURS, strict=True)) >= 2


def test_vae_decodes_its_encoding_to_the_same_image(quick: tuple[Path, dict, list]) -> None:
    out_dir, metrics, _ = quick
    vae = DiffusionPipeline.from_pretrained(out_dir).vae
    images, _, _ = dataset(8, seed=5, resolution=PROFILES["quick"].resolution)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.sample()).sample
    assert float((y - x).abs().max()) * 127.5 < 0.1
    assert metrics["vae_reconstruction_rmse"] < 0.1


def _short(profile: TrainProfile) -> TrainProfile:
    return dataclasses.replace(profile, images=256, unet_steps=3)


def test_same_seed_gives_identical_weights_and_another_seed_does_not() -> None:
    short = _short(PROFILES["quick"])
    first, _ = train_pipeline(short, seed=3)
    again, _ = train_pipeline(short, seed=3)
    other, _ = train_pipeline(short, seed=4)
    for name in ("unet", "text_encoder"):
        a, b, c = (getattr(pipe, name).state_dict() for pipe in (first, again, other))
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert not all(torch.equal(a[key], c[key]) for key in a)


def test_unknown_profile_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="quick"):
        train_diffusion(tmp_path / "x", profile="huge")
