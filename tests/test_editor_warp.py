"""GAN warping: the warp-field math, the request's validation, the low-rank update, and `zoo edit warp`.

Fast tests use an untrained shapes-world-sized generator and a few optimisation steps. The acceptance
measurement (a x1.3 stretch on 5 samples carried to 100 unseen ones) is slow: it trains a red-circle GAN
(about 30 s at one thread, cached for the session) and fits 2,000 steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from PIL import Image

import modelzoo
from modelzoo.demo.meters import aspect_ratios_of, measure
from modelzoo.demo.shapes import ShapeSpec, draw
from modelzoo.demo.train_gan import GAN_CONFIG, PROFILES, sample_images, save, train_gan
from modelzoo.editors.warp import WarpRequest, default_layer, karras_lr, resolve_layers
from modelzoo.editors.warp_field import WholeImageTransform, mls_affine, sampling_grid, warp_images
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.gan import load_gan
from modelzoo.registry.families.stylegan import StyleGanConfig, build
from modelzoo.registry.records import VersionInfo

STRETCH = {"samples": [{"seed": s} for s in range(5)], "transform": {"scale_x": 1.3}}
# The profile the acceptance GAN is trained with: the "full" profile stopped at 250 steps, which already
# draws red circles well (agreement 0.955 at 250 steps, 16 s; the full 1,000 steps are for corners: stars
# and squares) and keeps the slow tests four times shorter.
ACCEPTANCE_PROFILE = dataclasses.replace(PROFILES["full"], name="warp-acceptance", steps=250)
UNSEEN = list(range(1000, 1100))


def as_images(x: torch.Tensor) -> np.ndarray:
    return (x.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8).numpy()


def from_images(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 127.5


# --- the warp field ---------------------------------------------------------------------------------


def test_mls_affine_reproduces_an_exact_affine_map_given_consistent_points():
    g = torch.Generator().manual_seed(0)
    A = torch.tensor([[1.2, 0.3], [-0.2, 0.9]], dtype=torch.float64)
    b = torch.tensor([3.0, -2.0], dtype=torch.float64)
    p = torch.rand(6, 2, generator=g, dtype=torch.float64) * 32
    q = p @ A + b
    v = torch.rand(50, 2, generator=g, dtype=torch.float64) * 40 - 4
    assert torch.allclose(mls_affine(v, p, q), v @ A + b, atol=1e-9)


def test_mls_sends_every_control_point_exactly_to_its_image():
    p = torch.tensor([[4.0, 4.0], [20.0, 8.0], [10.0, 25.0], [28.0, 28.0]], dtype=torch.float64)
    q = p + torch.tensor([[3.0, 0.0], [-2.0, 1.0], [0.0, -4.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(mls_affine(p, p, q), q)


def test_held_corners_do_not_move_and_a_dragged_point_carries_the_content_to_its_target():
    grid = sampling_grid([(0.25, 0.5, 0.75, 0.5)], 64, 64, hold_corners=True)
    identity = sampling_grid([(0.5, 0.5, 0.5, 0.5)], 64, 64, hold_corners=True)
    for y, x in ((0, 0), (0, 63), (63, 0), (63, 63)):
        assert torch.allclose(grid[y, x], identity[y, x], atol=0.02)
    image = torch.zeros(1, 1, 64, 64)
    image[0, 0, 30:34, 14:18] = 1.0  # a blob around (0.25, 0.5)
    warped = warp_images(image, grid[None])[0, 0]
    y, x = divmod(int(warped.argmax()), 64)
    assert abs((x + 0.5) / 64 - 0.75) < 0.04 and abs((y + 0.5) / 64 - 0.5) < 0.04


def test_whole_image_stretch_is_the_exact_inverse_affine_about_the_centre():
    grid = sampling_grid(WholeImageTransform(scale_x=1.3).as_points(32, 32), 32, 32, hold_corners=False)
    centres = (torch.arange(32) + 0.5) / 32 * 2 - 1
    assert torch.allclose(grid[..., 0], (centres / 1.3)[None, :].expand(32, 32), atol=1e-6)
    assert torch.allclose(grid[..., 1], centres[:, None].expand(32, 32), atol=1e-6)


def test_stretching_a_drawn_circle_widens_it_by_the_requested_factor():
    circle = draw(ShapeSpec("circle", "red", 0.5, 0.5, 0.5), 64)[None]
    grid = sampling_grid(WholeImageTransform(scale_x=1.3).as_points(64, 64), 64, 64, hold_corners=False)
    stretched = as_images(warp_images(from_images(circle), grid[None]))
    assert aspect_ratios_of(stretched)[0] == pytest.approx(1.3, abs=0.03)
    assert measure(stretched)[0].colour == "red"


# --- the request --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_json", "message"),
    [
        ({"samples": [{"seed": 1, "points": [[0.5, 0.5, 1.2, 0.5]]}]}, "outside the image"),
        ({"samples": [{"seed": 1, "points": [[-0.1, 0.5, 0.5, 0.5]]}]}, "outside the image"),
        ({"samples": [{"seed": 1, "points": [[0.5, 0.5, 0.5]]}]}, "four numbers"),
        ({"samples": [{"seed": 1}]}, "no points"),
        ({"samples": [{"seed": -1, "points": [[0.5, 0.5, 0.6, 0.5]]}]}, "seeds must be integers"),
        ({"samples": [{"seed": 2**32}], "transform": {"scale_x": 1.3}}, "seeds must be integers"),
        ({"samples": [{"seed": "3"}], "transform": {"scale_x": 1.3}}, "seed must be an integer"),
        ({"samples": [{"seed": 3}, {"seed": 3}], "transform": {"scale_x": 1.3}}, "given twice"),
        ({"samples": [{"points": [[0.5, 0.5, 0.6, 0.5]]}]}, "exactly one of"),
        ({"samples": [{"seed": 1, "points": [[0.5, 0.5, 0.6, 0.5]]}], "transform": {"scale_x": 2}}, "not both"),
        ({"samples": [{"seed": 1}], "transform": {"scale_x": 1.0}}, "unchanged"),
        ({"samples": [{"seed": 1}], "transform": {"scale_x": -1.0}}, "positive"),
        ({"samples": [{"seed": 1}], "transform": {"stretch": 1.3}}, "unknown keys"),
        ({"samples": []}, "at least one sample"),
        ({**STRETCH, "rank": 0}, "rank must be"),
        ({**STRETCH, "iterations": 0}, "iterations must be"),
        ({**STRETCH, "loss": "perceptual"}, "loss must be"),
        ({**STRETCH, "rnak": 4}, "unknown keys"),
    ],
)
def test_bad_requests_are_refused_with_a_message_that_names_the_problem(request_json, message):
    with pytest.raises(BadInput, match=message):
        WarpRequest.from_json(request_json)


def test_request_file_keys_and_cli_overrides_combine():
    request = WarpRequest.from_json({**STRETCH, "layer": "b8.conv0", "rank": 4}, rank=8, iterations=None)
    assert request.layers == ("b8.conv0",) and request.rank == 8 and request.iterations == 2000
    assert WarpRequest.from_json({**STRETCH, "layer": [1, "b16.conv0"]}).layers == ("1", "b16.conv0")


def test_layers_resolve_by_name_short_name_or_reference_index_and_default_by_resolution():
    G = build(GAN_CONFIG, seed=0)
    assert resolve_layers(G, ["3", "b8.conv0", "synthesis.b8.conv0"]) == ["synthesis.b8.conv0", "synthesis.b16.conv0"]
    assert resolve_layers(G, []) == [default_layer(G)] == ["synthesis.b4.conv1"]
    with torch.device("meta"):
        big = build(StyleGanConfig.stylegan2_256())
    assert default_layer(big) == "synthesis.b64.conv1" == big.layer_names()[8]
    with pytest.raises(BadInput, match="no synthesis conv"):
        resolve_layers(G, ["b8.torgb"])
    with pytest.raises(BadInput, match="out of range"):
        resolve_layers(G, ["7"])


def test_karras_schedule_ramps_up_then_down_to_zero():
    rates = [karras_lr(s, 100, rampdown=0.5) for s in range(100)]
    assert rates[0] == 0 and max(rates) == 1 and rates[-1] < 0.01
    assert rates.index(1.0) == 5


# --- the edit on a tiny generator ----------------------------------------------------------------------


@pytest.fixture
def gan(zoo: modelzoo.Zoo, tiny_gan_dir: Path) -> VersionInfo:
    return zoo.import_(tiny_gan_dir, name="circles")


def quick(**changes: object) -> WarpRequest:
    return WarpRequest.from_json({**STRETCH, "iterations": 15, **changes})


def test_stored_delta_has_the_requested_rank_and_only_the_chosen_layer_changes(zoo, gan):
    child = zoo.edit(gan.ref, "warp", quick(layer="b8.conv0", rank=5))
    diff = zoo.diff(gan.ref, child.ref)
    assert [c.tensor for c in diff.changed] == ["synthesis.b8.conv0.weight"]
    name = "synthesis.b8.conv0.weight"
    delta = zoo.tensors(child.ref, [name])[name].double() - zoo.tensors(gan.ref, [name])[name].double()
    out_channels, in_channels, kh, kw = delta.shape
    singular = torch.linalg.svdvals(delta.permute(0, 2, 3, 1).reshape(out_channels * kh * kw, in_channels))
    assert int((singular > 1e-4 * singular[0]).sum()) == 5
    assert child.params["layers"] == ["synthesis.b8.conv0"] and child.params["rank"] == 5
    assert child.parents[0].ref == gan.ref and child.method == "warp"


def test_two_layers_each_get_their_own_update_of_the_requested_rank(zoo, gan):
    child = zoo.edit(gan.ref, "warp", quick(layer=["b8.conv1", "b4.conv1"], rank=3))
    changed = sorted(c.tensor for c in zoo.diff(gan.ref, child.ref).changed)
    assert changed == ["synthesis.b4.conv1.weight", "synthesis.b8.conv1.weight"]
    assert child.params["layers"] == ["synthesis.b4.conv1", "synthesis.b8.conv1"]


def test_fitting_moves_the_edited_samples_towards_their_warped_targets_and_reports_the_loss(zoo, gan):
    calls: list[tuple[int, int, dict[str, float]]] = []
    child = zoo.edit(gan.ref, "warp", quick(iterations=40, lr=3e-3), progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(i, 40) for i in range(1, 41)]
    assert all(set(c[2]) == {"loss"} and math.isfinite(c[2]["loss"]) for c in calls)
    m = child.metrics
    assert m["fit_loss_after"] < 0.7 * m["fit_loss_before"]
    assert child.params["request"]["transform"]["scale_x"] == 1.3


def test_an_edit_is_a_function_of_its_request(zoo, gan):
    a, b = (zoo.edit(gan.ref, "warp", quick(seed=7), name=f"run{i}") for i in range(2))
    c = zoo.edit(gan.ref, "warp", quick(seed=8), name="run2")
    assert a.manifest_hash == b.manifest_hash != c.manifest_hash


def test_explicit_latents_are_used_as_given_and_must_fit_the_generator(zoo, gan):
    z = np.random.RandomState(0).randn(GAN_CONFIG.z_dim).tolist()
    child = zoo.edit(gan.ref, "warp", WarpRequest.from_json(
        {"samples": [{"latent": z, "points": [[0.3, 0.5, 0.2, 0.5]]}], "iterations": 3}))
    assert child.method == "warp"
    short = WarpRequest.from_json({"samples": [{"latent": z[:10], "points": [[0.3, 0.5, 0.2, 0.5]]}]})
    with pytest.raises(BadInput, match="this generator's z has 64"):
        zoo.edit(gan.ref, "warp", short)


def test_the_editor_accepts_the_request_file_json_directly(zoo, gan):
    child = zoo.edit(gan.ref, "warp", {**STRETCH, "iterations": 2, "layer": 1, "rank": 2})
    assert child.params["layers"] == ["synthesis.b8.conv0"]


def test_lpips_without_its_weights_is_refused_before_fitting(zoo, gan):
    try:
        import lpips  # noqa: F401
    except ImportError:
        with pytest.raises(BadInput, match="lpips"):
            zoo.edit(gan.ref, "warp", quick(loss="lpips"))
    else:
        pytest.skip("lpips is installed here")


# --- the CLI ------------------------------------------------------------------------------------------


def write_request(path: Path, data: dict[str, object]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_zoo_edit_warp_registers_a_child_and_writes_a_before_after_grid_of_unseen_seeds(capsys, home, tmp_path,
                                                                                        tiny_gan_dir):
    assert zoo_cli(capsys, home, "import", str(tiny_gan_dir), "--name", "circles").code == 0
    request = write_request(tmp_path / "warp.json", {**STRETCH, "iterations": 3})
    grid = tmp_path / "out" / "grid.png"
    r = zoo_cli(capsys, home, "edit", "warp", "circles", "--request", str(request), "--rank", "4",
                "--grid", str(grid), "--preview-n", "6", "--json")
    assert r.code == 0, r.err
    report = json.loads(r.out)
    assert report["version"]["ref"] == "circles@2" and report["version"]["params"]["rank"] == 4
    assert report["preview_seeds"] == list(range(10_000, 10_006)) and report["grid"] == str(grid)
    with Image.open(grid) as sheet:
        assert sheet.size == (6 * 128, 2 * 128 + 4)
        pixels = np.asarray(sheet.convert("RGB"))
    parent = np.stack([s.image for s in modelzoo.open(home).sample("circles@1", [10_000])])
    top_left = np.asarray(Image.fromarray(parent[0]).resize((128, 128), Image.Resampling.NEAREST))
    assert np.array_equal(pixels[:128, :128], top_left)
    r = zoo_cli(capsys, home, "edit", "warp", "circles", "--request", str(request), "--iterations", "2",
                "--name", "wide-circles", "--grid", str(tmp_path / "g2.png"))
    assert r.code == 0 and "wide-circles@1" in r.out and "before/after grid" in r.out


@pytest.mark.parametrize(
    ("request_json", "flags", "message"),
    [
        ({"samples": [{"seed": 1, "points": [[0.5, 0.5, 1.5, 0.5]]}]}, [], "outside the image"),
        (STRETCH, ["--rank", "65", "--layer", "b8.conv0"], "rank 65 is larger than synthesis.b8.conv0 allows"),
        ({"samples": [{"seed": -3}], "transform": {"scale_x": 1.3}}, [], "seeds must be integers"),
        ({"samples": [{"seed": 3}, {"seed": 3}], "transform": {"scale_x": 1.3}}, [], "given twice"),
        ({"samples": [{"latent": [0.0, 1.0], "points": [[0.5, 0.5, 0.6, 0.5]]}]}, [], "z has 64"),
        (STRETCH, ["--preview-seed", "3"], "in the request"),
        (STRETCH, ["--layer", "b64.conv0"], "no synthesis conv"),
        (STRETCH, ["--iterations", "0"], "iterations must be"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_registers_nothing(capsys, home, tmp_path, tiny_gan_dir,
                                                               request_json, flags, message):
    zoo_cli(capsys, home, "import", str(tiny_gan_dir), "--name", "circles")
    request = write_request(tmp_path / "warp.json", request_json)
    before = snapshot(home)
    grid = tmp_path / "grid.png"
    r = zoo_cli(capsys, home, "edit", "warp", "circles", "--request", str(request), "--grid", str(grid), *flags)
    assert r.code == 2 and message in r.err and r.err.count("\n") == 1, r.err
    assert snapshot(home) == before and not grid.exists()


def test_a_missing_or_broken_request_file_and_a_non_gan_version_are_refused(capsys, home, tmp_path, gpt2_dir,
                                                                           tiny_gan_dir):
    zoo_cli(capsys, home, "import", str(tiny_gan_dir), "--name", "circles")
    zoo_cli(capsys, home, "import", str(gpt2_dir), "--name", "lm")
    request = write_request(tmp_path / "warp.json", {**STRETCH, "iterations": 2})
    (tmp_path / "broken.json").write_text("{not json")
    before = snapshot(home)
    cases = [
        (["circles", "--request", str(tmp_path / "nope.json")], "no warp request file"),
        (["circles", "--request", str(tmp_path / "broken.json")], "cannot read the warp request"),
        (["lm", "--request", str(request)], "lm@1 is a lm model; warp edits gan models"),
        (["circles", "--request", str(request), "--grid", str(tmp_path)], "is a folder"),
    ]
    for args, message in cases:
        r = zoo_cli(capsys, home, "edit", "warp", *args)
        assert r.code == 2 and message in r.err, r.err
    assert snapshot(home) == before


# --- the acceptance measurement (slow) -------------------------------------------------------------------


def trained_red_circles(cache: Path) -> Path:
    """The acceptance GAN, trained once per session and kept on disk (both test modules use it)."""
    folder = cache / "warp-red-circles"
    if not (folder / "config.json").is_file():
        save(train_gan("circle", "red", seed=0, profile=ACCEPTANCE_PROFILE), folder)
    return folder


@pytest.fixture(scope="session")
def red_circles_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_red_circles(tmp_path_factory.getbasetemp())


def meter_readings(G: torch.nn.Module, seeds: list[int]) -> tuple[np.ndarray, float]:
    """(aspect ratio per sample, share of samples whose colour meter reads red)."""
    readings = measure(sample_images(G, seeds))
    return np.array([r.aspect for r in readings]), float(np.mean([r.colour == "red" for r in readings]))


@pytest.mark.slow
def test_a_stretch_shown_on_five_samples_carries_over_to_unseen_samples(zoo, red_circles_dir):
    parent = zoo.import_(red_circles_dir, name="red-circles")
    child = zoo.edit(parent.ref, "warp", WarpRequest.from_json(STRETCH))
    aspect_before, red_before = meter_readings(load_gan(red_circles_dir), UNSEEN)
    aspect_after, red_after = meter_readings(zoo.load(child.ref).pipeline, UNSEEN)
    read = np.isfinite(aspect_before) & np.isfinite(aspect_after)
    change = aspect_after[read].mean() / aspect_before[read].mean()
    carried = (change - 1) / (1.3 - 1)
    print(f"\nstretch x1.3 on seeds 0-4: mean aspect {aspect_before[read].mean():.3f} -> "
          f"{aspect_after[read].mean():.3f} on {read.sum()} of 100 unseen samples = {carried:.0%} of the requested "
          f"change; colour agreement "
          f"{red_before:.2f} -> {red_after:.2f}; edit {child.metrics['edit_seconds']} s")
    assert read.sum() >= 90
    assert carried >= 0.6
    assert red_after >= 0.9 * red_before


def foreground_disc(image: np.ndarray) -> tuple[float, float, float]:
    """(cx, cy, radius) of the foreground, as fractions of the side: where a user would click."""
    x = image.astype(np.float32)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
    contrast = np.linalg.norm(x - np.median(border, axis=0), axis=-1)
    ys, xs = np.nonzero(contrast > 0.5 * np.percentile(contrast, 99))
    side = x.shape[1]
    return (xs.mean() + 0.5) / side, (ys.mean() + 0.5) / side, math.sqrt(len(xs) / math.pi) / side


@pytest.mark.slow
def test_a_stretch_dragged_with_control_points_carries_over_to_unseen_samples(zoo, red_circles_dir):
    """As a user would give it: on each of 5 samples the shape's left and right edges are dragged out to
    1.3 times their distance from its centre, its top, bottom and centre pinned, the corners held.
    MLS makes the targets themselves about x1.25 wide (measured 1.25); 58% of x1.3 was measured to carry."""
    seeds = list(range(5))
    samples = []
    for seed, image in zip(seeds, sample_images(load_gan(red_circles_dir), seeds), strict=True):
        cx, cy, r = foreground_disc(image)
        points = [[cx - r, cy, cx - 1.3 * r, cy], [cx + r, cy, cx + 1.3 * r, cy], [cx, cy - r, cx, cy - r],
                  [cx, cy + r, cx, cy + r], [cx, cy, cx, cy]]
        samples.append({"seed": seed, "points": [[min(max(float(c), 0.0), 1.0) for c in p] for p in points]})
    parent = zoo.import_(red_circles_dir, name="red-circles")
    child = zoo.edit(parent.ref, "warp", WarpRequest.from_json({"samples": samples}))
    aspect_before, red_before = meter_readings(load_gan(red_circles_dir), UNSEEN)
    aspect_after, red_after = meter_readings(zoo.load(child.ref).pipeline, UNSEEN)
    read = np.isfinite(aspect_before) & np.isfinite(aspect_after)
    carried = (aspect_after[read].mean() / aspect_before[read].mean() - 1) / (1.3 - 1)
    print(f"\ncontrol-point stretch x1.3 on seeds 0-4: {carried:.0%} of the requested change on {read.sum()} unseen "
          f"samples; colour agreement {red_before:.2f} -> {red_after:.2f}")
    assert carried >= 0.45
    assert red_after >= 0.9 * red_before
