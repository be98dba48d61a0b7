import math

import numpy as np
import pytest

from modelzoo.demo import shapes
from modelzoo.demo.shapes import BACKGROUND, COLOURS, RGB, SHAPES, ShapeSpec
from modelzoo.registry.errors import BadInput


def test_vocabulary_keeps_the_four_basic_colours_first_and_hues_apart():
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert COLOURS[:4] == ("red", "green", "blue", "yellow")
    hues = sorted(shapes.COLOUR_HUES.values())
    gaps = np.diff([*hues, hues[0] + 360])
    assert gaps.min() >= 30


def test_same_seed_gives_identical_images_captions_and_specs():
    a = shapes.dataset(64, seed=11)
    b = shapes.dataset(64, seed=11)
    assert a[0].tobytes() == b[0].tobytes()
    assert a[1] == b[1]
    assert a[2] == b[2]


def test_different_seed_gives_different_images():
    a, _, _ = shapes.dataset(64, seed=11)
    b, _, _ = shapes.dataset(64, seed=12)
    assert a.tobytes() != b.tobytes()


def test_first_specs_of_a_seed_do_not_depend_on_how_many_are_drawn():
    assert shapes.sample_specs(100, seed=5)[:10] == shapes.sample_specs(10, seed=5)


def test_dataset_images_are_uint8_and_many_are_cheap():
    images, captions, specs = shapes.dataset(10_000, seed=3)
    assert images.shape == (10_000, 32, 32, 3)
    assert images.dtype == np.uint8
    assert len(captions) == len(specs) == 10_000


def test_captions_name_each_specs_colour_and_shape():
    _, captions, specs = shapes.dataset(200, seed=21)
    assert captions == [f"a {s.colour} {s.shape}" for s in specs]


def test_caption_templates_are_drawn_from_the_given_ones():
    templates = shapes.CAPTION_TEMPLATES
    _, captions, specs = shapes.dataset(200, seed=21, templates=templates)
    used = [
        [t for t in templates if t.format(colour=s.colour, shape=s.shape) == c]
        for c, s in zip(captions, specs, strict=True)
    ]
    assert all(len(u) == 1 for u in used)
    assert len({u[0] for u in used}) == len(templates)


def test_sampling_respects_the_requested_shapes_and_colours():
    specs = shapes.sample_specs(300, seed=2, shapes=("star",), colours=("red", "blue"))
    assert {s.shape for s in specs} == {"star"}
    assert {s.colour for s in specs} == {"red", "blue"}


def test_draw_paints_the_colour_on_the_grey_background():
    image = shapes.draw(ShapeSpec("square", "blue", 0.5, 0.5, 0.7), resolution=32)
    assert image.shape == (32, 32, 3)
    assert image.dtype == np.uint8
    assert tuple(image[0, 0]) == BACKGROUND
    assert tuple(image[16, 16]) == RGB["blue"]


@pytest.mark.parametrize("name", shapes.BACKDROPS)
def test_backdrops_are_grey_so_the_shape_keeps_its_colour(name):
    background = shapes.backdrop(name, 32, np.random.default_rng(1))
    assert background.shape == (32, 32, 3) and background.dtype == np.float32
    assert background.min() >= 0 and background.max() <= 255
    assert all(np.array_equal(background[..., 0], background[..., c]) for c in (1, 2))
    image = shapes.draw(ShapeSpec("square", "blue", 0.5, 0.5, 0.7), 32, background)
    assert tuple(image[16, 16]) == RGB["blue"]
    assert tuple(image[0, 0]) == tuple(np.rint(background[0, 0]).astype(np.uint8))


def test_random_backdrops_vary_with_the_generator_and_the_fixed_ones_do_not():
    levels = {name: shapes.backdrop(name, 32, np.random.default_rng(2))[..., 0] for name in shapes.BACKDROPS}
    assert levels["white"].min() == 255 and levels["black"].max() == 0 and np.all(levels["grey"] == BACKGROUND[0])
    assert set(np.unique(levels["checkerboard"])) == {48, 208}
    assert levels["noise"].std() > 20
    ramp = levels["gradient"]
    corners = sorted([ramp[0, 0], ramp[0, -1], ramp[-1, 0], ramp[-1, -1]])
    assert corners[-1] - corners[0] > 1  # a ramp, not a flat grey
    for name in ("noise", "gradient"):
        again = shapes.backdrop(name, 32, np.random.default_rng(2))[..., 0]
        other = shapes.backdrop(name, 32, np.random.default_rng(3))[..., 0]
        assert np.array_equal(again, levels[name]) and not np.array_equal(other, levels[name])
    with pytest.raises(BadInput, match="checkerboard"):
        shapes.backdrop("plaid", 32)


def test_edges_are_anti_aliased():
    image = shapes.draw(ShapeSpec("circle", "red", 0.5, 0.5, 0.6), resolution=32)
    distinct = {tuple(p) for p in image.reshape(-1, 3)}
    assert len(distinct) > 5


def test_sampled_shapes_stay_inside_the_image_even_when_stretched():
    images, _, specs = shapes.dataset(300, seed=8, aspect_range=(0.6, 1.6))
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    assert (border == np.array(BACKGROUND, np.uint8)).all()
    assert max(s.size * s.aspect for s in specs) > 0.8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rotation", [0.0, 37.0])
def test_aspect_stretches_the_measured_width(shape, rotation):
    def width_and_height(aspect):
        alpha = shapes.coverage(ShapeSpec(shape, "red", 0.5, 0.5, 0.5, aspect, rotation), resolution=128)
        ys, xs = np.mgrid[0:128, 0:128]
        mean_x, mean_y = (alpha * xs).sum() / alpha.sum(), (alpha * ys).sum() / alpha.sum()
        var_x = (alpha * (xs - mean_x) ** 2).sum() / alpha.sum()
        var_y = (alpha * (ys - mean_y) ** 2).sum() / alpha.sum()
        return math.sqrt(var_x), math.sqrt(var_y)

    w1, h1 = width_and_height(1.0)
    w2, h2 = width_and_height(1.5)
    assert w2 / w1 == pytest.approx(1.5, rel=0.02)
    assert h2 / h1 == pytest.approx(1.0, rel=0.02)
    assert w2 / h2 == pytest.approx(1.5, rel=0.03)


def test_bounding_box_of_a_stretched_square_has_the_aspect():
    alpha = shapes.coverage(ShapeSpec("square", "red", 0.5, 0.5, 0.6, aspect=1.5), resolution=128)
    cols = np.flatnonzero(alpha.max(0) > 0.5)
    rows = np.flatnonzero(alpha.max(1) > 0.5)
    assert (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1) == pytest.approx(1.5, rel=0.03)


def test_sketch_is_a_dark_outline_on_white():
    spec = ShapeSpec("circle", "green", 0.5, 0.5, 0.8)
    drawing = shapes.sketch(spec, resolution=64)
    assert drawing.shape == (64, 64, 3)
    assert drawing.dtype == np.uint8
    assert tuple(drawing[0, 0]) == (255, 255, 255)
    assert tuple(drawing[32, 32]) == (255, 255, 255)
    assert drawing[32, 6:10].min() < 60
    assert (drawing < 128).mean() < 0.25


def test_sketch_strokes_are_as_wide_as_asked():
    spec = ShapeSpec("circle", "green", 0.5, 0.5, 0.8)
    inked = [(shapes.sketch(spec, 32, stroke) < 128).mean() for stroke in (1.0, 1.5, 3.0)]
    assert inked[0] < inked[1] < inked[2] and inked[2] > 1.6 * inked[0]


def test_invalid_specs_are_rejected_with_the_choices():
    with pytest.raises(BadInput, match="circle"):
        ShapeSpec("hexagon", "red", 0.5, 0.5, 0.5)
    with pytest.raises(BadInput, match="red"):
        ShapeSpec("circle", "teal", 0.5, 0.5, 0.5)
    with pytest.raises(BadInput):
        ShapeSpec("circle", "red", 0.5, 0.5, 0.5, aspect=0.0)
