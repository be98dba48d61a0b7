"""The shapes world's CLIP: the quick profile trains a usable embedder, saves it, and the `clip` family
loads it from the registry as a fast, deterministic encoder of images and texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import modelzoo
from modelzoo.demo.shapes import BASIC_COLOURS, dataset
from modelzoo.demo.train_clip import train_clip
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, get_family
from modelzoo.registry.families.clip import ClipFamily, load_clip

# The quick profile measured 0.84 (text to image) and 0.85 (image to 16 captions) for seed 0; chance is 1/16.
QUICK_TOP1_BAR = 0.6


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("clip") / "clip-shapes"
    steps: list[int] = []
    metrics = train_clip(out, seed=0, profile="quick", progress=lambda done, total, s: steps.append(done))
    assert steps == list(range(1, metrics["steps"] + 1))
    return out, metrics


@pytest.fixture(scope="module")
def imported(trained: tuple[Path, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    zoo = modelzoo.open(tmp_path_factory.mktemp("zoo") / "zoo")
    info = zoo.import_(trained[0], "clip-shapes")
    return zoo, info


@pytest.fixture(scope="module")
def loaded(imported: tuple[Any, Any]) -> LoadedModel:
    zoo, info = imported
    return ClipFamily().load(zoo.registry, info.ref)


def test_quick_clip_finds_the_right_slice_for_each_caption(trained):
    _, metrics = trained
    assert metrics["text_to_image_top1"] >= QUICK_TOP1_BAR
    assert metrics["image_to_text_top1"] >= QUICK_TOP1_BAR
    assert 0 < metrics["logit_scale"] <= 100 and metrics["seconds"] > 0


def test_saved_folder_imports_as_a_clip_version(trained, imported):
    out, _ = trained
    zoo, info = imported
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert info.family == "clip" and info.config["weight_files"] == {"": "model.safetensors"}


def test_registry_encoder_is_the_trained_one(trained, imported, loaded):
    out, metrics = trained
    _, info = imported
    encoder, from_folder = loaded.pipeline, load_clip(out)
    assert loaded.family == "clip" and encoder.id == info.ref
    # train_clip measured the folder's encoder; the registry's computes the same features bit for bit
    assert encoder.weights_hash == from_folder.weights_hash == metrics["weights_hash"]
    images, captions, _ = dataset(16, seed=3, colours=BASIC_COLOURS)
    np.testing.assert_array_equal(encoder.encode_images(images), from_folder.encode_images(images))
    np.testing.assert_array_equal(encoder.encode_texts(captions), from_folder.encode_texts(captions))


def test_features_are_unit_length_and_independent_of_batching_and_size(loaded):
    encoder = loaded.pipeline
    images, captions, _ = dataset(24, seed=5, colours=BASIC_COLOURS)
    u = encoder.encode_images(images)
    t = encoder.encode_texts(captions)
    assert u.shape == (24, encoder.embed_dim) and t.shape == (24, encoder.embed_dim) and u.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_images(images, batch_size=12), u, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(captions[:3]), t[:3], atol=1e-5)
    # the same drawings at 64 x 64 are resized to the model's 32 x 32 input first
    big, _, _ = dataset(4, seed=5, resolution=64, colours=BASIC_COLOURS)
    assert np.all((encoder.encode_images(big) * u[:4]).sum(1) > 0.8)


def test_an_encoder_cannot_be_sampled_or_edited(loaded):
    family = ClipFamily()
    with pytest.raises(BadInput, match="an encoder cannot be sampled"):
        family.sample(loaded, [0])
    assert family.editable_tensors(loaded) == []
    with pytest.raises(BadInput, match="uint8"):
        loaded.pipeline.encode_images(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_zoo_load_finds_the_clip_family_through_its_entry_point(imported, loaded):
    zoo, info = imported
    assert type(get_family("clip")).__name__ == "ClipFamily"
    via_zoo = zoo.load(info.ref)
    assert via_zoo.family == "clip" and via_zoo.pipeline.weights_hash == loaded.pipeline.weights_hash
