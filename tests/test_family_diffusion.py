"""The `diffusion` family: a tiny Stable Diffusion pipeline imported, loaded from the registry's tensors,
sampled per seed and exported."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import get_family
from modelzoo.registry.families.diffusion import DiffusionFamily, sd1_text_encoder, sd1_unet

PROMPT = "a red circle"
STEPS = 2


@pytest.fixture
def sd(zoo, sd_dir):  # type: ignore[no-untyped-def]
    """(version info, loaded model) of the tiny pipeline."""
    info = zoo.import_(sd_dir, "sd")
    return info, get_family("diffusion").load(zoo.registry, info.ref)


def _native_image(pipe, seed: int, **options) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What a diffusers user gets for one seed: one image from its own generator, as uint8."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np", **options).images[0]
    return (image * 255).round().astype(np.uint8)


def test_diffusion_family_is_found_through_its_entry_point():
    family = get_family("diffusion")
    assert isinstance(family, DiffusionFamily)
    assert family.takes_prompts and family.needs_prompt


def test_load_assigns_the_registry_tensors_to_every_component_without_copying(zoo, sd_dir, monkeypatch):
    info = zoo.import_(sd_dir, "sd")
    handed_out: dict[str, torch.Tensor] = {}
    original = zoo.registry.load_tensors

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        handed_out.update(original(*args, **kwargs))
        return handed_out

    monkeypatch.setattr(zoo.registry, "load_tensors", recording)
    model = get_family("diffusion").load(zoo.registry, info.ref)
    assert type(model.pipeline).__name__ == "StableDiffusionPipeline"
    assert sorted(model.modules) == ["text_encoder", "unet", "vae"]
    assert model.pipeline.unet is model.modules["unet"] and model.tokenizer is model.pipeline.tokenizer
    live = model.named_tensors()
    assert set(live) == set(handed_out)
    for name, tensor in handed_out.items():
        assert live[name].data_ptr() == tensor.data_ptr(), name
    assert not any(m.training for m in model.modules.values())


def test_same_seed_gives_the_same_image_and_a_seed_does_not_depend_on_its_batch(sd):
    _, model = sd
    family = get_family("diffusion")
    alone = family.sample(model, [5], prompt=PROMPT, steps=STEPS)
    again = family.sample(model, [5], prompt=PROMPT, steps=STEPS)
    batch = family.sample(model, [3, 5], prompt=PROMPT, steps=STEPS)
    image = alone[0].image
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    assert np.array_equal(image, again[0].image)
    assert [s.seed for s in batch] == [3, 5] and np.array_equal(batch[1].image, image)
    assert not np.array_equal(batch[0].image, image)
    assert all(s.prompt == PROMPT and s.text is None for s in batch)


def test_batched_sampling_starts_each_seed_from_its_own_latent(sd):
    _, model = sd
    family = get_family("diffusion")
    one_by_one = family.sample(model, [3, 5, 8], prompt=PROMPT, steps=STEPS)
    batched = family.sample(model, [3, 5, 8], prompt=PROMPT, steps=STEPS, batch_size=2)
    for a, b in zip(one_by_one, batched, strict=True):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1


def test_options_left_out_are_left_to_the_pipeline_defaults(sd):
    """The pipeline's own defaults apply (50 steps, guidance 7.5, native size); only seeds are fixed."""
    _, model = sd
    calls: list[dict] = []

    def recording(prompts, **options):  # type: ignore[no-untyped-def]
        calls.append(options)
        return SimpleNamespace(images=np.zeros((len(prompts), 16, 16, 3), dtype=np.float32))

    model.pipeline = recording
    get_family("diffusion").sample(model, [4, 9], prompt=PROMPT)
    get_family("diffusion").sample(model, [4], prompt=PROMPT, steps=3, guidance_scale=2.0, height=8, width=8)
    assert [sorted(c) for c in calls[:2]] == [["generator", "output_type"]] * 2
    assert [g.initial_seed() for c in calls[:2] for g in c["generator"]] == [4, 9]
    assert {k: calls[2][k] for k in ("num_inference_steps", "guidance_scale", "height", "width")} == {
        "num_inference_steps": 3, "guidance_scale": 2.0, "height": 8, "width": 8,
    }


def test_size_and_guidance_options_reach_the_pipeline(sd):
    _, model = sd
    family = get_family("diffusion")
    [large] = family.sample(model, [1], prompt=PROMPT, steps=STEPS, height=32, width=24)
    [unguided] = family.sample(model, [1], prompt=PROMPT, steps=STEPS, guidance_scale=1.0)
    [guided] = family.sample(model, [1], prompt=PROMPT, steps=STEPS)
    assert large.image.shape == (32, 24, 3)
    assert not np.array_equal(unguided.image, guided.image)


def test_export_samples_exactly_what_the_adapter_samples(zoo, sd, tmp_path):
    from diffusers import DiffusionPipeline

    info, model = sd
    samples = get_family("diffusion").sample(model, [3, 5], prompt=PROMPT, steps=STEPS)
    exported = DiffusionPipeline.from_pretrained(zoo.export(info.ref, tmp_path / "export"))
    for sample in samples:
        assert np.array_equal(sample.image, _native_image(exported, sample.seed, num_inference_steps=STEPS))


def test_an_edited_unet_changes_the_images_of_the_same_seeds(zoo, sd):
    info, model = sd
    family = get_family("diffusion")
    keys = [n for n in family.editable_tensors(model) if "attn2.to_k" in n]
    assert keys
    child = zoo.commit(info.ref, {n: model.tensor(n) * 3 for n in keys}, method="test-edit")
    edited = family.load(zoo.registry, child.ref)
    parent_images = family.sample(model, [3, 5], prompt=PROMPT, steps=STEPS)
    child_images = family.sample(edited, [3, 5], prompt=PROMPT, steps=STEPS)
    assert all(not np.array_equal(p.image, c.image) for p, c in zip(parent_images, child_images, strict=True))
    assert torch.equal(edited.tensor(keys[0]), model.tensor(keys[0]) * 3)


def test_editable_tensors_are_every_unet_tensor(zoo, sd):
    info, model = sd
    names = get_family("diffusion").editable_tensors(model)
    assert sorted(names) == sorted(n for n in zoo.tensors(info.ref) if n.startswith("unet/"))


def test_sampling_needs_a_prompt_and_valid_seeds(sd):
    _, model = sd
    family = get_family("diffusion")
    with pytest.raises(BadInput, match="prompt"):
        family.sample(model, [0])
    with pytest.raises(BadInput, match="seeds"):
        family.sample(model, [-1], prompt=PROMPT, steps=STEPS)
    with pytest.raises(BadInput, match="batch_size"):
        family.sample(model, [0], prompt=PROMPT, steps=STEPS, batch_size=0)


def test_a_version_missing_a_unet_tensor_is_refused(zoo, sd):
    info, model = sd
    name = get_family("diffusion").editable_tensors(model)[0]
    child = zoo.commit(info.ref, {}, method="test-drop", removed=[name])
    with pytest.raises(BadInput, match="lacks tensors"):
        get_family("diffusion").load(zoo.registry, child.ref)


def test_sd1_shapes_have_the_published_parameter_counts():
    with torch.device("meta"):
        unet, text_encoder = sd1_unet(), sd1_text_encoder()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert text_encoder.config.hidden_size == 768 and text_encoder.config.num_hidden_layers == 12
