"""Warp fields for GAN warping: control points (or a whole-image affine) -> a backward sampling grid.

A user says, for one sample, that the content at source point s_i moves to target point t_i. The warped
image is read backwards: output pixel v takes the colour of the original at f(v), where f is the smooth
map that sends every target t_i back to its source s_i. As in the reference (PeterWang512/GANWarping,
`util/util.py` `get_warp_grid` and `lib/mls.py`), f is the moving-least-squares affine deformation of

    Schaefer, McPhail, Warren, "Image Deformation Using Moving Least Squares", SIGGRAPH 2006, sec. 2.1:
        f_a(v) = (v - p*) M^-1 B + q*,   M = sum_i w_i p^_i^T p^_i,   B = sum_i w_i p^_i^T q^_i,
        w_i = 1 / |p_i - v|^(2 alpha),   p* = sum w_i p_i / sum w_i,   q* likewise,   p^_i = p_i - p*,
    with p the control points f starts from (here the targets) and q where they go (the sources),
    row vectors, alpha = 1,

and the four image corners are held fixed (added as identity pairs) so the warp stays local and the
frame does not move. MLS affine reproduces any affine map exactly when all pairs agree with it, which
is how a whole-image transform (`WholeImageTransform`) becomes control points too: its four moved
corners, with no corners held.

Coordinates in requests are fractions of the image's width and height from its top-left corner, so (0, 0)
and (1, 1) are the outer corners of the corner pixels; the MLS weights are computed in pixel units so
that distances are isotropic on non-square images. The grid is in `grid_sample`'s convention
(align_corners=False: -1 and 1 are the outer image edges), sampled with reflection padding as the
reference does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modelzoo.registry.errors import BadInput

PointPair = tuple[float, float, float, float]
"""(xs, ys, xt, yt): the content at (xs, ys) moves to (xt, yt), as fractions of width and height."""

CORNERS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))

# Below this det(M) / trace(M)^2 the weighted targets are (nearly) collinear around v and M cannot be
# inverted reliably; MLS then falls back to the translation q* - p*, as the reference does.
SINGULAR = 1e-9


@dataclass(frozen=True)
class WholeImageTransform:
    """One affine applied to every sample: x' = c + Rot(rotate_deg) Scale(scale_x, scale_y) (x - c) + shift.

    The centre c and the shift are fractions of the image; the rotation (degrees, clockwise on screen
    since y points down) and the scales act in pixels. `scale_x=1.3` is a horizontal stretch by 30%
    about the centre.
    """

    scale_x: float = 1.0
    scale_y: float = 1.0
    rotate_deg: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    centre_x: float = 0.5
    centre_y: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise BadInput(f"transform.{f.name} must be a finite number, got {value!r}")
        if self.scale_x <= 0 or self.scale_y <= 0:
            raise BadInput(f"transform scales must be positive, got scale_x {self.scale_x}, scale_y {self.scale_y}")

    @classmethod
    def from_json(cls, data: Any) -> WholeImageTransform:
        if not isinstance(data, Mapping):
            raise BadInput(f"transform must be an object such as {{\"scale_x\": 1.3}}, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"transform has unknown keys {unknown}; it takes {sorted(known)}")
        return cls(**data)

    def is_identity(self) -> bool:
        return (self.scale_x, self.scale_y, self.rotate_deg, self.shift_x, self.shift_y) == (1, 1, 0, 0, 0)

    def apply(self, x: float, y: float, height: int, width: int) -> tuple[float, float]:
        """Where the fraction point (x, y) goes, as a fraction point."""
        angle = math.radians(self.rotate_deg)
        dx, dy = (x - self.centre_x) * width * self.scale_x, (y - self.centre_y) * height * self.scale_y
        rx, ry = math.cos(angle) * dx - math.sin(angle) * dy, math.sin(angle) * dx + math.cos(angle) * dy
        return self.centre_x + self.shift_x + rx / width, self.centre_y + self.shift_y + ry / height

    def as_points(self, height: int, width: int) -> tuple[PointPair, ...]:
        """The four image corners and where the transform sends them: MLS affine reproduces it exactly."""
        return tuple((x, y, *self.apply(x, y, height, width)) for x, y in CORNERS)


def parse_points(points: Any, where: str) -> tuple[PointPair, ...]:
    """Validate a sample's `points`: a non-empty list of [xs, ys, xt, yt], every coordinate in [0, 1]."""
    if not isinstance(points, Sequence) or isinstance(points, str) or not points:
        raise BadInput(f"{where}: points must be a non-empty list of [xs, ys, xt, yt]")
    parsed: list[PointPair] = []
    for k, point in enumerate(points):
        ok = isinstance(point, Sequence) and not isinstance(point, str) and len(point) == 4
        if not ok or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in point):
            raise BadInput(f"{where}: point {k} must be four numbers [xs, ys, xt, yt], got {point!r}")
        if not all(math.isfinite(c) and 0.0 <= c <= 1.0 for c in point):
            raise BadInput(
                f"{where}: point {k} {list(point)} lies outside the image; coordinates are fractions of the "
                "width and height in [0, 1] from the top-left corner"
            )
        parsed.append((float(point[0]), float(point[1]), float(point[2]), float(point[3])))
    return tuple(parsed)


def mls_affine(v: Tensor, p: Tensor, q: Tensor, alpha: float = 1.0) -> Tensor:
    """The MLS affine deformation f_a (module docstring) at points v (..., 2), for controls p -> q (n, 2).

    f(p_i) = q_i exactly; where M is singular (all weight on collinear controls) f is the translation
    v - p* + q*.
    """
    d2 = (v[..., None, :] - p).square().sum(-1)  # (..., n)
    at_control = d2 == 0
    w = d2.clamp_min(torch.finfo(d2.dtype).tiny).pow(-alpha)
    w = w / w.sum(-1, keepdim=True)
    p_star = (w[..., None] * p).sum(-2)
    q_star = (w[..., None] * q).sum(-2)
    p_hat = p - p_star[..., None, :]  # (..., n, 2)
    q_hat = q - q_star[..., None, :]
    M = torch.einsum("...n,...ni,...nj->...ij", w, p_hat, p_hat)
    B = torch.einsum("...n,...ni,...nj->...ij", w, p_hat, q_hat)
    det = M[..., 0, 0] * M[..., 1, 1] - M[..., 0, 1] * M[..., 1, 0]
    trace = M[..., 0, 0] + M[..., 1, 1]
    singular = det <= SINGULAR * trace.square()
    eye = torch.eye(2, dtype=M.dtype, device=M.device)
    M_inv = torch.linalg.inv(torch.where(singular[..., None, None], eye, M))
    out = ((v - p_star)[..., None, :] @ M_inv @ B).squeeze(-2) + q_star
    out = torch.where(singular[..., None], v - p_star + q_star, out)
    # Exactly on a control point w_i is infinite; the limit of f there is q_i.
    hit = at_control.any(-1)
    if bool(hit.any()):
        out[hit] = q[at_control[hit].float().argmax(-1)]
    return out


def sampling_grid(points: Sequence[PointPair], height: int, width: int, hold_corners: bool = True) -> Tensor:
    """The backward map of a warp as a `grid_sample` grid (height, width, 2), float32.

    Output pixel centres v are mapped by MLS affine with the targets as controls and the sources as
    their images, so output(v) = input(f(v)) moves the content at each source to its target.
    """
    pairs = list(points) + ([(x, y, x, y) for x, y in CORNERS] if hold_corners else [])
    scale = torch.tensor([width, height], dtype=torch.float64)
    pq = torch.tensor(pairs, dtype=torch.float64)
    sources, targets = pq[:, :2] * scale, pq[:, 2:] * scale
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64) + 0.5, torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij"
    )
    source_at = mls_affine(torch.stack([xs, ys], -1), targets, sources)
    return (source_at / scale * 2 - 1).float()


def warp_images(images: Tensor, grids: Tensor) -> Tensor:
    """Images (N, C, H, W) warped by grids (N, H, W, 2) from `sampling_grid`: bilinear, reflected at the edges."""
    return F.grid_sample(images, grids.to(images), mode="bilinear", padding_mode="reflection", align_corners=False)
