import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.stylegan import (
    Generator,
    StyleGanConfig,
    build,
    latents_for_seeds,
    local_to_official,
    modulate_weight,
    modulated_conv2d,
    official_to_local,
    upsample2x,
)

TINY = StyleGanConfig.tiny()


@pytest.fixture(scope="module")
def tiny() -> Generator:
    return build(TINY, seed=0).eval()


def _perturbed(seed: int) -> Generator:
    """A tiny generator whose noise strengths, biases and w_avg are non-zero, so every path counts."""
    G = build(TINY, seed=seed).eval()
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
            elif name.startswith("synthesis") and name.endswith(".bias") and ".affine." not in name:
                p.fill_(0.1)
        G.mapping.w_avg.fill_(0.25)
    return G


def test_tiny_generator_makes_images_of_config_shape_within_unit_range(tiny: Generator) -> None:
    z = latents_for_seeds([0, 1, 2], TINY.z_dim)
    ws = tiny.mapping(z)
    img = tiny.synthesis(ws)
    assert ws.shape == (3, TINY.num_ws, TINY.w_dim) == (3, 8, 64)
    assert img.shape == (3, 3, 32, 32)
    assert img.min() >= -1 and img.max() <= 1
    assert img.std() > 0.05


@torch.no_grad()
def test_same_seeds_give_identical_bytes_and_another_seed_differs(tiny: Generator) -> None:
    z = latents_for_seeds([5, 6], TINY.z_dim)
    first = tiny(z).numpy().tobytes()
    assert tiny(z).numpy().tobytes() == first
    assert build(TINY, seed=0).eval()(z).numpy().tobytes() == first
    other = tiny(latents_for_seeds([5, 9], TINY.z_dim))
    assert torch.equal(other[0], tiny(z)[0])
    assert not torch.allclose(other[1], tiny(z)[1])


def test_latent_for_a_seed_does_not_depend_on_its_batch() -> None:
    pair = latents_for_seeds([3, 7], 512)
    assert torch.equal(pair[1], latents_for_seeds([7], 512)[0])
    assert torch.equal(pair[0], latents_for_seeds([3], 512)[0])
    # The official generate.py draws np.random.RandomState(seed).randn(1, z_dim).
    assert torch.equal(pair[1], torch.from_numpy(np.random.RandomState(7).randn(512)).float())
    assert pair.dtype == torch.float32 and latents_for_seeds([], 4).shape == (0, 4)
    with pytest.raises(BadInput):
        latents_for_seeds([-1], 4)


def test_truncation_psi_zero_collapses_every_z_to_w_avg() -> None:
    G = build(TINY, seed=0).eval()
    G.mapping.estimate_w_avg(num_samples=256)
    z = latents_for_seeds([1, 2, 3, 4], TINY.z_dim)
    ws = G.mapping(z, truncation_psi=0.0)
    assert torch.allclose(ws, G.mapping.w_avg.expand_as(ws))
    img = G(z, truncation_psi=0.0)
    assert torch.equal(img[0], img[3])
    assert not torch.allclose(G(z)[0], G(z)[3])


def test_truncation_cutoff_truncates_only_the_first_ws(tiny: Generator) -> None:
    z = latents_for_seeds([1], TINY.z_dim)
    full = tiny.mapping(z)
    cut = tiny.mapping(z, truncation_psi=0.0, truncation_cutoff=3)
    assert torch.equal(cut[:, :3], tiny.mapping.w_avg.expand(1, 3, -1))
    assert torch.equal(cut[:, 3:], full[:, 3:])


def test_state_dict_under_official_names_loads_and_gives_identical_output() -> None:
    source = _perturbed(seed=1)
    official = local_to_official(source.state_dict())
    assert "synthesis.b8.resample_filter" in official and "synthesis.b8.conv0.resample_filter" in official
    assert torch.allclose(official["synthesis.b8.resample_filter"].sum(), torch.tensor(1.0))
    target = build(TINY, seed=2).eval()
    target.load_state_dict(official_to_local(official))
    z = latents_for_seeds([11, 12], TINY.z_dim)
    assert torch.equal(target(z, truncation_psi=0.7), source(z, truncation_psi=0.7))


def test_conditional_official_checkpoint_is_refused_with_a_reason() -> None:
    with pytest.raises(BadInput, match="conditional"):
        official_to_local({"mapping.embed.weight": torch.zeros(1)})


def test_output_matches_official_stylegan2_ada_implementation() -> None:
    # Computed once with NVlabs/stylegan2-ada-pytorch training/networks.py (CPU reference ops,
    # force_fp32, noise_mode='const', truncation_psi=0.7, clamp off) from local_to_official(G.state_dict()).
    G = _perturbed(seed=0)
    img = G(latents_for_seeds([0, 1], TINY.z_dim), truncation_psi=0.7, clamp=False)
    expected = torch.tensor(OFFICIAL_SLICE).flatten()
    assert torch.allclose(img[:, :, 14:17, 14:17].flatten()[:12], expected, atol=1e-4)
    assert torch.allclose(img[1, 2, 0, :4], torch.tensor(OFFICIAL_BORDER), atol=1e-4)


OFFICIAL_SLICE = [
    [0.69363, 0.69443, 0.09532, -0.10887, 0.77354, 0.82148],
    [2.4784, 3.42446, 0.52739, 0.00279, -0.1833, -1.78012],
]
OFFICIAL_BORDER = [0.10878, 2.82353, 0.48193, 1.38354]


def test_noise_modes_const_is_fixed_random_varies_none_omits() -> None:
    G = _perturbed(seed=0)
    z = latents_for_seeds([4], TINY.z_dim)
    const = G(z, noise_mode="const", clamp=False)
    assert torch.equal(const, G(z, noise_mode="const", clamp=False))
    assert not torch.allclose(const, G(z, noise_mode="none", clamp=False))
    assert not torch.allclose(G(z, noise_mode="random"), G(z, noise_mode="random"))
    with pytest.raises(BadInput):
        G(z, noise_mode="fixed")  # type: ignore[arg-type]


def test_demodulated_weights_have_unit_norm_and_give_unit_std_outputs() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, 3, 3, generator=gen) * 3
    styles = torch.rand(2, 16, generator=gen) * 4 + 0.1
    w = modulate_weight(weight, styles)
    norms = w.square().sum(dim=(2, 3, 4)).sqrt()
    assert torch.allclose(norms, torch.ones(2, 8), atol=1e-5)

    x = torch.randn(2, 16, 96, 96, generator=gen)
    y = modulated_conv2d(x, weight, styles)[:, :, 1:-1, 1:-1]
    std = y.std(dim=(2, 3))
    assert torch.allclose(std, torch.ones(2, 8), atol=0.08)
    undemodulated = modulated_conv2d(x, weight, styles, demodulate=False)[:, :, 1:-1, 1:-1]
    assert undemodulated.std() > 5


def test_upsampling_is_bilinear_inside_and_zero_padded_at_the_border() -> None:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    up = upsample2x(x)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert up.shape == (2, 3, 16, 16)
    assert torch.allclose(up[:, :, 1:-1, 1:-1], bilinear[:, :, 1:-1, 1:-1], atol=1e-6)
    assert torch.allclose(up[:, :, 0, 1:-1], 0.75 * bilinear[:, :, 0, 1:-1], atol=1e-6)
    assert upsample2x(x, margin=1).shape == (2, 3, 18, 18)


def _official_256_shapes(channel_base: int) -> dict[str, tuple[int, ...]]:
    """The state dict of stylegan2-ada-pytorch's Generator(512, 0, 512, 256, 3), resample filters dropped."""

    def ch(res: int) -> int:
        return min(channel_base // res, 512)

    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(8):
        shapes[f"mapping.fc{i}.weight"] = (512, 512)
        shapes[f"mapping.fc{i}.bias"] = (512,)
    shapes["mapping.w_avg"] = (512,)
    shapes["synthesis.b4.const"] = (ch(4), 4, 4)
    for res in (4, 8, 16, 32, 64, 128, 256):
        convs = {"conv1": ch(res)} if res == 4 else {"conv0": ch(res // 2), "conv1": ch(res)}
        for conv, c_in in convs.items():
            p = f"synthesis.b{res}.{conv}"
            shapes |= {
                f"{p}.weight": (ch(res), c_in, 3, 3),
                f"{p}.affine.weight": (c_in, 512),
                f"{p}.affine.bias": (c_in,),
                f"{p}.noise_strength": (),
                f"{p}.noise_const": (res, res),
                f"{p}.bias": (ch(res),),
            }
        p = f"synthesis.b{res}.torgb"
        shapes |= {
            f"{p}.weight": (3, ch(res), 1, 1),
            f"{p}.affine.weight": (ch(res), 512),
            f"{p}.affine.bias": (ch(res),),
            f"{p}.bias": (3,),
        }
    return shapes


def test_stylegan2_256_on_meta_device_has_official_names_shapes_and_size() -> None:
    config = StyleGanConfig.stylegan2_256()
    with torch.device("meta"):
        G = Generator(config)
    shapes = {name: tuple(t.shape) for name, t in G.state_dict().items()}
    assert shapes == _official_256_shapes(config.channel_base)
    assert G.num_ws == 14
    # Equal to the official Generator's parameter count for the same arguments (config-f, 256x256).
    assert sum(p.numel() for p in G.parameters()) == 30_034_338
    assert sum(p.numel() for p in G.mapping.parameters()) == 2_101_248
    layers = G.layer_names()
    assert len(layers) == 13 and layers[0] == "synthesis.b4.conv1" and layers[8] == "synthesis.b64.conv1"


def test_config_round_trips_through_json_and_rejects_bad_fields() -> None:
    for config in (TINY, StyleGanConfig.stylegan2_256()):
        assert StyleGanConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(BadInput, match="unknown"):
        StyleGanConfig.from_dict({**TINY.to_dict(), "c_dim": 10})
    with pytest.raises(BadInput, match="power of two"):
        StyleGanConfig(z_dim=8, w_dim=8, resolution=48)
    with pytest.raises(BadInput):
        StyleGanConfig.from_dict({"z_dim": 8})
