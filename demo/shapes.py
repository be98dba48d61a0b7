"""The shapes world: procedurally drawn coloured shapes with captions and known ground truth.

No hub weights can be downloaded, so every claim of the project (search finds the model trained on
"red circles", an eraser removes "red", a warp widens shapes) is checked on this world, where what an
image contains is known exactly and can be measured back with `modelzoo.demo.meters`.

Drawing conventions, which the meters rely on:
- The background is one achromatic mid grey, `BACKGROUND`. Blending a colour with any grey keeps its
  hue, so anti-aliased, blurred or faded edges still vote for the right colour; mid grey (rather than
  black or white) leaves room on both sides for noise, so a generator's or the test's noise is not
  clipped into a biased, tinted background, and it is zero after the usual [-1, 1] scaling, which tiny
  generators learn first.
- `backdrop` draws other achromatic backgrounds (white, black, noise, gradients, a checkerboard): not the
  world's, but the styles a user's query may come in, for the embedder to learn to look past.
- Every colour is highly saturated (chroma about 200 of 255) and colours differ in hue by at least 30
  degrees, so the meters separate foreground from background by chroma and name colours by hue.
- Every shape is regular with at least three-fold symmetry, so its second moments are isotropic under
  any rotation; `aspect` stretches horizontally after rotation, so the foreground's width/height from
  second moments is exactly `aspect`.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from modelzoo.registry.errors import BadInput

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Hue in degrees; the first four are the required vocabulary, the last two make near-miss neighbours
# (orange beside red and yellow, purple beside blue) that specificity checks need.
COLOUR_HUES: dict[str, float] = {
    "red": 0.0,
    "green": 120.0,
    "blue": 240.0,
    "yellow": 60.0,
    "purple": 285.0,
    "orange": 30.0,
}
COLOURS: tuple[str, ...] = tuple(COLOUR_HUES)
BASIC_COLOURS: tuple[str, ...] = COLOURS[:4]


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


RGB: dict[str, tuple[int, int, int]] = {name: _hsv_to_rgb(h, 0.9, 0.9) for name, h in COLOUR_HUES.items()}
BACKGROUND: tuple[int, int, int] = (128, 128, 128)

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {colour} {shape} on a grey background",
    "a drawing of a {colour} {shape}",
)

SUPERSAMPLE = 4
CIRCLE_VERTICES = 96
MARGIN = 0.04
"""Sampled shapes keep this fraction of the image clear on every side (over one pixel at 32 x 32)."""
STAR_POINTS = 5
STAR_INNER_RATIO = 0.45
"""Inner/outer radius of the star; fatter than a regular pentagram (0.38) so points survive 32 px."""


@dataclass(frozen=True)
class ShapeSpec:
    """One drawable shape; positions and sizes are fractions of the image side.

    `size` is the diameter of the circle that circumscribes the unstretched shape (so a rotation never
    changes its extent); `aspect` then scales it horizontally by width/height = `aspect` (height stays
    `size`); `rotation` is in degrees, counter-clockwise, applied before the stretch.
    """

    shape: str
    colour: str
    cx: float
    cy: float
    size: float
    aspect: float = 1.0
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise BadInput(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise BadInput(f"unknown colour {self.colour!r}; choose one of {', '.join(COLOURS)}")
        if not (self.size > 0 and self.aspect > 0):
            raise BadInput(f"size and aspect must be positive, got size={self.size}, aspect={self.aspect}")


def _unit_outline(shape: str) -> np.ndarray:
    """Vertices (K, 2) of the shape on the unit circle, first vertex pointing up, in y-up coordinates."""
    if shape == "circle":
        count, radii = CIRCLE_VERTICES, np.ones(CIRCLE_VERTICES)
    elif shape == "square":
        count, radii = 4, np.ones(4)
    elif shape == "triangle":
        count, radii = 3, np.ones(3)
    else:
        count = 2 * STAR_POINTS
        radii = np.where(np.arange(count) % 2 == 0, 1.0, STAR_INNER_RATIO)
    # A square stands on a side rather than a corner; the others point up.
    offset = math.pi / 4 if shape == "square" else math.pi / 2
    angles = offset + 2 * math.pi * np.arange(count) / count
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def outline(spec: ShapeSpec, resolution: int) -> list[tuple[float, float]]:
    """The shape's polygon in pixel coordinates (x right, y down) of a `resolution`-sized image."""
    points = _unit_outline(spec.shape)
    theta = math.radians(spec.rotation)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    points = points @ rotation.T
    radius = spec.size * resolution / 2
    x = spec.cx * resolution + points[:, 0] * radius * spec.aspect
    y = spec.cy * resolution - points[:, 1] * radius
    return list(zip(x.tolist(), y.tolist(), strict=True))


def coverage(spec: ShapeSpec, resolution: int = 32) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 in [0, 1]: drawn at 4x and box-downsampled."""
    big = resolution * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).polygon(outline(spec, big), fill=255)
    small = canvas.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


BACKDROPS: tuple[str, ...] = ("grey", "white", "black", "noise", "gradient", "checkerboard")


def backdrop(name: str, resolution: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """An achromatic background (H, W, 3) float32 in [0, 255], so that the shape's colour stays the only hue:
    the world's `grey`; `white`; `black`; `noise` (per-pixel grey around a random level); `gradient` (a ramp
    between two random greys at a random angle); `checkerboard` (4-pixel light and dark squares). The
    random ones draw from `rng` (a fixed seed when None)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    shape = (resolution, resolution)
    if name == "grey":
        grey = np.full(shape, float(BACKGROUND[0]), np.float32)
    elif name == "white":
        grey = np.full(shape, 255.0, np.float32)
    elif name == "black":
        grey = np.zeros(shape, np.float32)
    elif name == "noise":
        grey = rng.uniform(40, 215) + rng.normal(0, 40, shape)
    elif name == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        y, x = (np.indices(shape) + 0.5) / resolution - 0.5
        ramp = 0.5 + (x * math.cos(angle) + y * math.sin(angle)) / math.sqrt(2)  # 0 .. 1 across the image
        start, end = rng.uniform(0, 255, 2)
        grey = start + (end - start) * ramp
    elif name == "checkerboard":
        grey = 48 + 160 * (np.add.outer(np.arange(resolution) // 4, np.arange(resolution) // 4) % 2)
    else:
        raise BadInput(f"unknown backdrop {name!r}; choose one of {', '.join(BACKDROPS)}")
    return np.repeat(np.clip(grey, 0, 255).astype(np.float32)[..., None], 3, axis=2)


def _composite(alpha: np.ndarray, colours: Sequence[str], backgrounds: np.ndarray | None = None) -> np.ndarray:
    """Blend per-image colours over the world's background, or over `backgrounds` (N, H, W, 3); alpha is
    (N, H, W), result uint8 (N, H, W, 3)."""
    fg = np.array([RGB[c] for c in colours], dtype=np.float32)[:, None, None, :]
    bg = np.array(BACKGROUND, dtype=np.float32) if backgrounds is None else backgrounds
    a = alpha[..., None]
    return np.rint(bg * (1 - a) + fg * a).astype(np.uint8)


def draw(spec: ShapeSpec, resolution: int = 32, background: np.ndarray | None = None) -> np.ndarray:
    """The shape in its colour on the grey background (or on `background`, see `backdrop`), uint8 (H, W, 3)."""
    behind = None if background is None else background[None]
    return _composite(coverage(spec, resolution)[None], [spec.colour], behind)[0]


def sketch(spec: ShapeSpec, resolution: int = 32, stroke: float = 1.5) -> np.ndarray:
    """A black outline of the shape on white, uint8 (H, W, 3): what a user would draw as a query. `stroke`
    is the line width in pixels at 32 x 32 (scaled with `resolution`); the default 1.5 is thin enough to be
    a line and thick enough to survive the box filter."""
    big = resolution * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 255)
    width = max(SUPERSAMPLE, round(stroke * SUPERSAMPLE * resolution / 32))
    points = outline(spec, big)
    ImageDraw.Draw(canvas).line([*points, points[0], points[1]], fill=0, width=width, joint="curve")
    small = np.asarray(canvas.resize((resolution, resolution), Image.Resampling.BOX))
    return np.repeat(small[..., None], 3, axis=2)


def caption(spec: ShapeSpec, template: str = CAPTION_TEMPLATES[0]) -> str:
    """The spec's caption, e.g. "a red circle"; `template` has `{colour}` and `{shape}` fields."""
    return template.format(colour=spec.colour, shape=spec.shape)


def sample_specs(
    n: int,
    seed: int,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    size_range: tuple[float, float] = (0.4, 0.75),
    aspect_range: tuple[float, float] = (1.0, 1.0),
    rotate: bool = True,
) -> list[ShapeSpec]:
    """`n` random specs, deterministic for the seed: uniform shape, colour, size, aspect, rotation.

    The centre is drawn so that the whole (stretched) shape stays `MARGIN` inside the image, which keeps
    the border pure background for the meters; a size too large for its aspect is shrunk to fit. The
    aspect is drawn log-uniformly so that widening and narrowing are equally likely. The first k specs
    of a seed are the same for every n >= k.
    """
    # One row of uniforms per sample, so the first k specs do not depend on n.
    u = np.random.default_rng(seed).random((n, 7))
    shape_idx = (u[:, 0] * len(shapes)).astype(int)
    colour_idx = (u[:, 1] * len(colours)).astype(int)
    sizes = size_range[0] + u[:, 2] * (size_range[1] - size_range[0])
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    aspects = np.exp(log_lo + u[:, 3] * (log_hi - log_lo))
    rotations = u[:, 4] * 360.0 if rotate else np.zeros(n)
    room = 1 - 2 * MARGIN
    sizes = np.minimum(sizes, room / np.maximum(aspects, 1.0))
    width, height = sizes * aspects, sizes
    cx = MARGIN + width / 2 + u[:, 5] * (room - width)
    cy = MARGIN + height / 2 + u[:, 6] * (room - height)
    return [
        ShapeSpec(
            shape=shapes[shape_idx[i]],
            colour=colours[colour_idx[i]],
            cx=float(cx[i]),
            cy=float(cy[i]),
            size=float(sizes[i]),
            aspect=float(aspects[i]),
            rotation=float(rotations[i]),
        )
        for i in range(n)
    ]


def render(specs: Sequence[ShapeSpec], resolution: int = 32, backgrounds: np.ndarray | None = None) -> np.ndarray:
    """Draw many specs at once, uint8 (N, H, W, 3), on the grey background or on `backgrounds` (N, H, W, 3)."""
    if not specs:
        return np.zeros((0, resolution, resolution, 3), dtype=np.uint8)
    alpha = np.stack([coverage(s, resolution) for s in specs])
    return _composite(alpha, [s.colour for s in specs], backgrounds)


def dataset(
    n: int,
    seed: int,
    resolution: int = 32,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    size_range: tuple[float, float] = (0.4, 0.75),
    aspect_range: tuple[float, float] = (1.0, 1.0),
    rotate: bool = True,
    templates: Sequence[str] = CAPTION_TEMPLATES[:1],
) -> tuple[np.ndarray, list[str], list[ShapeSpec]]:
    """`n` images (N, H, W, 3) uint8 with their captions and specs, deterministic for the seed.

    The specs come from `sample_specs` with the same arguments; each caption uses a template chosen at
    random from `templates`.
    """
    specs = sample_specs(n, seed, shapes, colours, size_range, aspect_range, rotate)
    template_idx = (np.random.default_rng([seed, 1]).random(n) * len(templates)).astype(int)
    captions = [caption(s, templates[t]) for s, t in zip(specs, template_idx, strict=True)]
    return render(specs, resolution), captions, specs
