import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import modelzoo
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, get_family
from modelzoo.registry.families.gan import (
    GanFamily,
    convert_official_state_dict,
    gan_config_json,
    images_to_uint8,
    load_gan,
    save_gan,
)
from modelzoo.registry.families.stylegan import (
    Generator,
    StyleGanConfig,
    build,
    latents_for_seeds,
    local_to_official,
)
from modelzoo.registry.records import VersionInfo

TINY = StyleGanConfig.tiny()


def _generator(seed: int = 0) -> Generator:
    """A tiny generator with non-zero noise strengths and w_avg, so noise and truncation paths count."""
    G = build(TINY, seed=seed).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
        G.mapping.w_avg.normal_(generator=torch.Generator().manual_seed(seed))
    return G


@torch.no_grad()
def _reference_images(G: Generator, seeds: list[int]) -> np.ndarray:
    return np.stack([images_to_uint8(G(latents_for_seeds([s], TINY.z_dim)))[0] for s in seeds])


def _images(model: LoadedModel, seeds: list[int], **options: float) -> np.ndarray:
    return np.stack([s.image for s in GanFamily().sample(model, seeds, **options)])  # type: ignore[misc]


@pytest.fixture
def gan(zoo: modelzoo.Zoo, tmp_path: Path) -> VersionInfo:
    return zoo.import_(save_gan(_generator(0), TINY, tmp_path / "gan"), name="faces")


@pytest.fixture
def model(zoo: modelzoo.Zoo, gan: VersionInfo) -> LoadedModel:
    return GanFamily().load(zoo.registry, gan.ref)


def test_saved_gan_imports_as_gan_and_loads_through_the_entry_point(zoo, gan):
    assert gan.family == "gan" and gan.method == "import"
    family = get_family("gan")
    assert isinstance(family, GanFamily) and not family.takes_prompts and not family.needs_prompt
    loaded = family.load(zoo.registry, "faces@latest")
    assert loaded.ref == "faces@1" and loaded.family == "gan"
    assert loaded.config == gan_config_json(TINY)
    (sample,) = family.sample(loaded, [3])
    assert sample.seed == 3 and sample.prompt is None and sample.text is None
    assert sample.image is not None and sample.image.dtype == np.uint8 and sample.image.shape == (32, 32, 3)
    assert np.array_equal(sample.image, _reference_images(_generator(0), [3])[0])


def test_same_seed_gives_identical_bytes_and_another_seed_differs(zoo, gan, model):
    first = _images(model, [11])
    assert _images(model, [11]).tobytes() == first.tobytes()
    reloaded = GanFamily().load(zoo.registry, gan.ref)
    assert _images(reloaded, [11]).tobytes() == first.tobytes()
    assert not np.array_equal(_images(model, [12]), first)


def test_a_seed_gives_the_same_image_alone_and_inside_a_batch(model):
    batch = _images(model, [3, 4, 5, 6])
    assert batch[2].tobytes() == _images(model, [5])[0].tobytes()
    assert len({im.tobytes() for im in batch}) == 4


def test_truncation_psi_zero_draws_the_mean_image_for_every_seed(model):
    images = _images(model, [1, 2, 3], truncation_psi=0.0)
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    assert not np.array_equal(_images(model, [1]), _images(model, [2]))


def test_child_with_a_changed_synthesis_weight_samples_differently_and_the_parent_still_matches(zoo, gan, model):
    name = "synthesis.b16.conv0.weight"
    assert name in GanFamily().editable_tensors(model)
    before = _images(model, [7, 8])
    weight = model.tensor(name)
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    child = zoo.commit(gan.ref, {name: weight + 0.5 * noise}, method="test-edit")
    assert child.ref == "faces@2" and child.family == "gan"

    child_images = _images(GanFamily().load(zoo.registry, child.ref), [7, 8])
    parent_images = _images(GanFamily().load(zoo.registry, gan.ref), [7, 8])
    assert not np.array_equal(child_images[0], before[0]) and not np.array_equal(child_images[1], before[1])
    assert parent_images.tobytes() == before.tobytes()
    assert _images(model, [7, 8]).tobytes() == before.tobytes()


def test_editable_tensors_are_the_synthesis_conv_and_torgb_base_weights_in_forward_order(model):
    names = GanFamily().editable_tensors(model)
    assert names[:4] == [
        "synthesis.b4.conv1.weight", "synthesis.b4.torgb.weight",
        "synthesis.b8.conv0.weight", "synthesis.b8.conv1.weight",
    ]
    assert names[-1] == "synthesis.b32.torgb.weight"
    assert len(names) == 3 * len(TINY.block_resolutions) - 1
    assert set(names) <= set(model.named_tensors())
    assert not any(".affine." in n or n.startswith("mapping.") for n in names)


def test_export_writes_a_folder_that_load_gan_reads_back_with_identical_images(zoo, gan, model, tmp_path):
    out = zoo.export(gan.ref, tmp_path / "exported")
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text()) == gan_config_json(TINY)
    G = load_gan(out)
    assert G.config == TINY
    assert _reference_images(G, [0, 9]).tobytes() == _images(model, [0, 9]).tobytes()
    copy = GanFamily().load(zoo.registry, zoo.import_(out, name="faces-copy").ref)
    assert _images(copy, [0, 9]).tobytes() == _images(model, [0, 9]).tobytes()


def test_official_state_dict_with_resample_filters_loads_through_the_mapping(zoo, tmp_path):
    official = local_to_official(_generator(4).state_dict())
    assert any(k.endswith("resample_filter") for k in official)
    converted = convert_official_state_dict(official)
    assert not any(k.endswith("resample_filter") for k in converted)
    assert convert_official_state_dict(converted).keys() == converted.keys()

    info = zoo.import_(save_gan(official, TINY, tmp_path / "official"), name="official")
    loaded = GanFamily().load(zoo.registry, info.ref)
    assert _images(loaded, [2, 3]).tobytes() == _reference_images(_generator(4), [2, 3]).tobytes()


def test_tensors_that_do_not_fit_the_config_are_refused_before_anything_is_written(tmp_path):
    narrow = dataclasses.replace(TINY, channel_max=32)
    with pytest.raises(BadInput, match="wrong shape"):
        save_gan(_generator(0).state_dict(), narrow, tmp_path / "bad")
    incomplete = {k: v for k, v in _generator(0).state_dict().items() if k != "mapping.w_avg"}
    with pytest.raises(BadInput, match="missing"):
        save_gan(incomplete, TINY, tmp_path / "bad")
    with pytest.raises(BadInput, match="built from"):
        save_gan(_generator(0), narrow, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_prompt_random_noise_or_an_unknown_option_is_refused(model):
    family = GanFamily()
    with pytest.raises(BadInput, match="no prompt"):
        family.sample(model, [0], prompt="a cat")
    with pytest.raises(BadInput, match="noise_mode"):
        family.sample(model, [0], noise_mode="random")  # type: ignore[arg-type]
    with pytest.raises(BadInput, match="steps"):
        family.sample(model, [0], steps=10)


def test_loading_a_version_of_another_family_is_refused(zoo, gpt2_dir):
    info = zoo.import_(gpt2_dir, name="gpt2-tiny")
    with pytest.raises(BadInput, match="not a gan model"):
        GanFamily().load(zoo.registry, info.ref)
