"""GAN warping: rewrite a generator so that all its samples follow a geometric change shown on a few.

Wang, Bau, Zhu, "Rewriting Geometric Rules of a GAN" (SIGGRAPH 2022, arXiv 2207.14288), as the reference
code does it (PeterWang512/GANWarping, `models/wrapper/lowrank_wrapper.py`, `trainers/warp_trainer.py`):

- Targets: for the request's latents z_j, the frozen generator's image G0(w_j) warped by the user's
  control points (`warp_field`: MLS affine, image corners held), recomputed at every step.
- Update: one synthesis convolution's base weight (before modulation) becomes
      W = W0 + einsum("orhw,ri->oihw", Lambda, D),  Lambda (out, r, kh, kw) zero-initialised,
      D (r, in) random,
  so Delta W, read as an (out*kh*kw) x in matrix, has rank r; both factors are optimised with Adam
  (betas 0.9, 0.99) to minimise loss(G_W(w), warp(G0(w))).
- Style mixing at every step: the W+ entries from `mix_from` on (the fine styles; the reference mixes
  8-15 of 16) come from mapping(z') of a fresh z', for the edited and the frozen generator alike, so
  the update learns the geometry and not the few samples' textures.
- Loss: the reference uses LPIPS (VGG) alone, at lr 0.05. LPIPS needs downloaded VGG weights, so the
  default here is a pixel MSE; `loss="lpips"` works where the `lpips` package and torchvision's VGG16
  weights are available locally. Defaults (rank 32, Adam lr 1e-3, 2,000 steps, pixel MSE, constant
  rate) follow REFERENCE.md's measurement on a shapes-world GAN; the default layer was chosen by
  measuring on this project's GAN (`default_layer`; the slow test in tests/test_editor_warp.py).

A sample's seed means `latents_for_seeds([seed])`, the latent `zoo sample --seed` draws from (truncation
psi 1, stored noise), so the targets are warps of exactly the images a user looked at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from modelzoo.editors.base import EditProgress, EditResult
from modelzoo.editors.warp_field import (
    PointPair,
    WholeImageTransform,
    parse_points,
    sampling_grid,
    warp_images,
)
from modelzoo.registry.errors import BadInput
from modelzoo.registry.factors import LowRank
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.families.stylegan import Generator, latents_for_seeds

Loss = Literal["mse", "l1", "lpips"]
LOSSES: tuple[str, ...] = ("mse", "l1", "lpips")
LrSchedule = Literal["constant", "karras"]
LR_SCHEDULES: tuple[str, ...] = ("constant", "karras")
MAX_SEED = 2**32
VGG16_WEIGHTS = "vgg16-397923af.pth"  # the torchvision file lpips.LPIPS(net="vgg") loads


@dataclass(frozen=True)
class WarpSample:
    """One user-warped sample: its latent (a seed, or an explicit z) and its control-point pairs.

    `points` may be empty only when the request carries a whole-image `transform`.
    """

    seed: int | None = None
    latent: tuple[float, ...] | None = None
    points: tuple[PointPair, ...] = ()

    def label(self, index: int) -> str:
        return f"sample {index} (seed {self.seed})" if self.seed is not None else f"sample {index}"


@dataclass(frozen=True)
class WarpRequest:
    """A warp edit: the samples and their warps, and how to fit the update.

    `layers`: synthesis convs to update, by name (`synthesis.b8.conv1` or `b8.conv1`) or by index in
    `Generator.layer_names()` (the reference's "layer index"); empty means `default_layer`.
    `rank`: of each layer's update, at most the layer's input channels.
    `lr_schedule`: "constant", or "karras" (the reference's cosine ramp: up over the first 5% of steps,
    down over the last `lr_rampdown` of them).
    `mix_from`: first W+ entry replaced in style mixing; None is half of num_ws (the reference's 8 of 16).
    `hold_corners`: add the image corners as fixed points to per-sample warps (a whole-image
    `transform` moves the corners by definition, so it ignores this).
    `seed`: seeds D's initialisation, the style-mixing latents and batch draws, so an edit is repeatable.

    As a request file (DESIGN.md, CLI contract), with "layer" for `layers` and every other field
    optional:

        {"samples": [{"seed": 3, "points": [[0.30, 0.5, 0.22, 0.5], [0.70, 0.5, 0.78, 0.5]]},
                     {"latent": [0.1, -1.2, ...], "points": [...]}],
         "layer": "b4.conv1", "rank": 32, "iterations": 2000}
        {"samples": [{"seed": 0}, {"seed": 1}], "transform": {"scale_x": 1.3}}
    """

    samples: tuple[WarpSample, ...]
    transform: WholeImageTransform | None = None
    layers: tuple[str, ...] = ()
    rank: int = 32
    iterations: int = 2000
    lr: float = 1e-3
    lr_schedule: LrSchedule = "constant"
    lr_rampdown: float = 0.5
    batch_size: int = 8
    loss: Loss = "mse"
    style_mixing: bool = True
    mix_from: int | None = None
    hold_corners: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.samples:
            raise BadInput("a warp request needs at least one sample: {\"samples\": [{\"seed\": 3, \"points\": ...}]}")
        checks = [
            (_is_int(self.rank) and self.rank >= 1, f"rank must be an integer >= 1, got {self.rank!r}"),
            (_is_int(self.iterations) and self.iterations >= 1, f"iterations must be >= 1, got {self.iterations!r}"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}"),
            (_is_number(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (_is_number(self.lr_rampdown) and 0 < self.lr_rampdown <= 1, "lr_rampdown must lie in (0, 1]"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (isinstance(self.style_mixing, bool), "style_mixing must be true or false"),
            (isinstance(self.hold_corners, bool), "hold_corners must be true or false"),
            (self.mix_from is None or _is_int(self.mix_from), f"mix_from must be an integer, got {self.mix_from!r}"),
            (_is_int(self.seed) and 0 <= self.seed < MAX_SEED, f"seed must be an integer in [0, 2**32): {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadInput(message)
        self._check_samples()

    def _check_samples(self) -> None:
        seen: dict[int, int] = {}
        for i, s in enumerate(self.samples):
            where = s.label(i)
            if (s.seed is None) == (s.latent is None):
                raise BadInput(f"{where}: give exactly one of \"seed\" and \"latent\"")
            if s.seed is not None:
                if not _is_int(s.seed) or not 0 <= s.seed < MAX_SEED:
                    raise BadInput(f"{where}: seeds must be integers in [0, 2**32), got {s.seed!r}")
                if s.seed in seen:
                    raise BadInput(f"seed {s.seed} is given twice (samples {seen[s.seed]} and {i}); merge its points")
                seen[s.seed] = i
            if s.latent is not None and not all(_is_number(c) and math.isfinite(c) for c in s.latent):
                raise BadInput(f"{where}: latent must be a list of finite numbers")
            if self.transform is not None and s.points:
                raise BadInput(f"{where}: give either per-sample points or a whole-image transform, not both")
            if self.transform is None and not s.points:
                raise BadInput(f"{where} has no points; give points or a whole-image \"transform\"")
        if self.transform is not None and self.transform.is_identity():
            raise BadInput("the transform leaves the image unchanged; there is nothing to learn")

    @classmethod
    def from_json(cls, data: Any, **overrides: Any) -> WarpRequest:
        """A request from a request file's JSON (DESIGN.md, CLI contract), with CLI flags in `overrides`.

        The file may say "layer" (a name, an index, or a list of them) for `layers`; unknown keys are
        refused, so a typo does not silently fall back to a default.
        """
        if not isinstance(data, Mapping):
            raise BadInput("a warp request is a JSON object: {\"samples\": [{\"seed\": 3, \"points\": [...]}]}")
        data = dict(data)
        if "layer" in data:
            data["layers"] = data.pop("layer")
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            takes = sorted(known - {"layers"} | {"layer"})
            raise BadInput(f"the warp request has unknown keys {unknown}; it takes {takes}")
        samples = data.get("samples")
        if not isinstance(samples, Sequence) or isinstance(samples, str):
            raise BadInput('the warp request needs "samples": a list of {"seed": S, "points": [[xs, ys, xt, yt], ...]}')
        data["samples"] = tuple(_sample_from_json(s, i) for i, s in enumerate(samples))
        if data.get("transform") is not None:
            data["transform"] = WholeImageTransform.from_json(data["transform"])
        layers = data.get("layers", ())
        layers = [layers] if isinstance(layers, str | int) else layers
        if not isinstance(layers, Sequence) or not all(isinstance(x, str | int) for x in layers):
            raise BadInput(f"layer must be a layer name, an index, or a list of them, got {layers!r}")
        data["layers"] = tuple(str(x) for x in layers)
        try:
            return cls(**data)
        except TypeError as exc:
            raise BadInput(f"bad warp request: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sample_from_json(data: Any, index: int) -> WarpSample:
    if not isinstance(data, Mapping):
        raise BadInput(f"sample {index} must be an object with \"seed\" (or \"latent\") and \"points\"")
    unknown = sorted(set(data) - {"seed", "latent", "points"})
    if unknown:
        raise BadInput(f"sample {index} has unknown keys {unknown}; it takes seed, latent and points")
    seed, latent = data.get("seed"), data.get("latent")
    if seed is not None and not _is_int(seed):
        raise BadInput(f"sample {index}: seed must be an integer, got {seed!r}")
    if latent is not None and (not isinstance(latent, Sequence) or isinstance(latent, str)):
        raise BadInput(f"sample {index}: latent must be a list of numbers (a z vector)")
    sample = WarpSample(seed=seed, latent=None if latent is None else tuple(latent))
    points = data.get("points")
    if points is None or points == []:  # recorded provenance of a whole-image transform lists no points
        return sample
    return WarpSample(seed=sample.seed, latent=sample.latent, points=parse_points(points, sample.label(index)))


def default_layer(G: Generator) -> str:
    """The layer edited when the request names none.

    From 256x256 up: `synthesis.b64.conv1`, index 8 of `layer_names()`, the layer the reference's
    scripts edit. Below: the 4x4 conv, chosen by measurement on the 32x32 shapes-world GAN (x1.3
    stretch on 5 samples, rank 32, 2,000 steps, share of the stretch carried to 100 unseen samples):
    4x4 79%, 8x8 (conv0) 46%, 8x8 (conv1) 30%, 16x16 16%. On a small generator the coarse layer holds
    the layout, and an update there generalises instead of memorising the few samples.
    """
    if G.img_resolution >= 256:
        return "synthesis.b64.conv1"
    return "synthesis.b4.conv1"


def resolve_layers(G: Generator, layers: Sequence[str]) -> list[str]:
    """Layer names (in forward order, no repeats) for names, short names (b8.conv1) or indices."""
    names = G.layer_names()
    if not layers:
        return [default_layer(G)]
    chosen: list[str] = []
    for layer in layers:
        if layer.lstrip("-").isdigit():
            index = int(layer)
            if not 0 <= index < len(names):
                raise BadInput(f"layer index {index} is out of range; this generator has layers 0-{len(names) - 1}")
            name = names[index]
        else:
            name = layer if layer.startswith("synthesis.") else f"synthesis.{layer}"
            if name not in names:
                raise BadInput(f"no synthesis conv {layer!r}; choose one of {', '.join(names)} (or an index)")
        if name not in chosen:
            chosen.append(name)
    return sorted(chosen, key=names.index)


@dataclass
class LowRankUpdate:
    """Delta W = einsum("orhw,ri->oihw", Lambda, D) for one conv weight W0 (out, in, kh, kw)."""

    layer: str
    W0: Tensor
    Lambda: Tensor
    D: Tensor

    @classmethod
    def init(cls, layer: str, W0: Tensor, rank: int, generator: torch.Generator) -> LowRankUpdate:
        out_channels, in_channels, kh, kw = W0.shape
        # the factors are trained in at least float32: Adam's steps would vanish in a half-precision weight
        dtype = torch.promote_types(W0.dtype, torch.float32)
        Lambda = torch.zeros(out_channels, rank, kh, kw, device=W0.device, dtype=dtype, requires_grad=True)
        # a seeded CPU draw, so a seed gives the same factors on every device
        D = torch.randn(rank, in_channels, generator=generator).to(W0.device, dtype).requires_grad_(True)
        return cls(layer, W0, Lambda, D)

    def delta(self) -> Tensor:
        return torch.einsum("orhw,ri->oihw", self.Lambda, self.D).to(self.W0.dtype)

    def weight(self) -> Tensor:
        return self.W0 + self.delta()

    def factors(self) -> LowRank:
        """Delta W as the registry stores it: B (out * kh * kw, r) from Lambda, A = D (r, in)."""
        B = self.Lambda.detach().permute(0, 2, 3, 1).reshape(-1, self.Lambda.shape[1])
        return LowRank(B.cpu().contiguous(), self.D.detach().cpu().contiguous())


@dataclass
class WarpPlan:
    """A validated request bound to a generator: the latents, one sampling grid per sample, the layers."""

    z: Tensor
    grids: Tensor
    layers: list[str]
    mix_from: int


def plan_warp(G: Generator, request: WarpRequest) -> WarpPlan:
    """Check everything that depends on the generator (layers, rank, latent size, mixing range) and build
    the grids; raises BadInput before any optimisation."""
    layers = resolve_layers(G, request.layers)
    for name in layers:
        out_channels, in_channels, kh, kw = G.get_submodule(name).weight.shape
        limit = min(in_channels, out_channels * kh * kw)
        if request.rank > limit:
            raise BadInput(f"rank {request.rank} is larger than {name} allows: its weight has {in_channels} input "
                           f"channels, so an update has rank at most {limit}")
    mix_from = G.num_ws // 2 if request.mix_from is None else request.mix_from
    if request.style_mixing and not 1 <= mix_from < G.num_ws:
        raise BadInput(f"mix_from must lie in [1, {G.num_ws - 1}] for a generator with {G.num_ws} styles")
    rows = []
    for i, s in enumerate(request.samples):
        if s.seed is not None:
            rows.append(latents_for_seeds([s.seed], G.z_dim)[0])
        else:
            assert s.latent is not None
            if len(s.latent) != G.z_dim:
                raise BadInput(f"{s.label(i)}: latent has {len(s.latent)} numbers; this generator's z has {G.z_dim}")
            rows.append(torch.tensor(s.latent, dtype=torch.float32))
    if request.loss == "lpips":
        _lpips_loss()
    res = G.img_resolution
    grids = []
    for s in request.samples:
        points = request.transform.as_points(res, res) if request.transform is not None else s.points
        hold = request.hold_corners and request.transform is None
        grids.append(sampling_grid(points, res, res, hold_corners=hold))
    device = G.mapping.w_avg.device
    return WarpPlan(z=torch.stack(rows).to(device), grids=torch.stack(grids).to(device), layers=layers,
                    mix_from=mix_from)


def _lpips_loss() -> torch.nn.Module:
    """LPIPS (VGG) if it can run offline; BadInput naming what is missing otherwise."""
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        raise BadInput("loss \"lpips\" needs the lpips package (pip install lpips); use loss \"mse\"") from None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS
    if not weights.is_file():
        raise BadInput(f"loss \"lpips\" needs torchvision's VGG16 weights at {weights}; use loss \"mse\" offline")
    module: torch.nn.Module = lpips.LPIPS(net="vgg", verbose=False)
    return module.eval().requires_grad_(False)


def karras_lr(step: int, total: int, rampdown: float, rampup: float = 0.05) -> float:
    """The StyleGAN projector's learning-rate ramp the reference uses (`lr_schedule karras`), in [0, 1]."""
    t = step / total
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return ramp * min(1.0, t / rampup) if rampup > 0 else ramp


class WarpFit:
    """The optimisation state: the low-rank updates and how to run the generator with them."""

    def __init__(self, G: Generator, plan: WarpPlan, request: WarpRequest) -> None:
        self.G = G
        self.plan = plan
        self.request = request
        self.rng = torch.Generator().manual_seed(request.seed)
        self.updates = [
            LowRankUpdate.init(name, G.get_submodule(name).weight.detach(), request.rank, self.rng)
            for name in plan.layers
        ]
        self.criterion = _lpips_loss() if request.loss == "lpips" else None
        with torch.no_grad():
            self.ws = G.mapping(plan.z)
        self.unmixed: tuple[Tensor, Tensor] | None = None  # the original images and their targets, unmixed

    def synthesize(self, ws: Tensor) -> Tensor:
        """The edited generator's raw images (unclamped, so saturated pixels keep their gradient).

        The updated weights are passed with `functional_call`, so the generator itself is never modified
        and the frozen original is the same module called without them.
        """
        weights = {u.layer.removeprefix("synthesis.") + ".weight": u.weight() for u in self.updates}
        return functional_call(self.G.synthesis, weights, (ws,), {"noise_mode": "const", "clamp": False})

    def targets(self, ws: Tensor, index: Tensor) -> Tensor:
        with torch.no_grad():
            return warp_images(self.G.synthesis(ws, noise_mode="const", clamp=False), self.plan.grids[index])

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.criterion is not None:
            return self.criterion(output, target).mean()
        if self.request.loss == "l1":
            return F.l1_loss(output, target)
        return F.mse_loss(output, target)

    def batch(self) -> tuple[Tensor, Tensor]:
        """(sample indices, their W+ styles with the fine styles mixed in from fresh latents)."""
        n = len(self.ws)
        size = self.request.batch_size
        index = torch.arange(n) if n <= size else torch.randperm(n, generator=self.rng)[:size]
        ws = self.ws[index].clone()
        if self.request.style_mixing:
            z_mix = torch.randn(len(index), self.G.z_dim, generator=self.rng).to(ws.device)  # seeded CPU draw
            with torch.no_grad():
                ws[:, self.plan.mix_from :] = self.G.mapping(z_mix)[:, self.plan.mix_from :]
        return index.to(ws.device), ws

    def run(self, progress: EditProgress | None) -> list[float]:
        request = self.request
        params = [t for u in self.updates for t in (u.Lambda, u.D)]
        optimizer = torch.optim.Adam(params, lr=request.lr, betas=(0.9, 0.99))
        losses = []
        for step in range(request.iterations):
            if request.lr_schedule == "karras":
                for group in optimizer.param_groups:
                    group["lr"] = request.lr * karras_lr(step, request.iterations, request.lr_rampdown)
            index, ws = self.batch()
            target = self.targets(ws, index)
            loss = self.loss(self.synthesize(ws), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, request.iterations, {"loss": losses[-1]})
        return losses

    @torch.no_grad()
    def fit_error(self, edited: bool) -> float:
        """The loss on the request's own samples, unmixed: how far the (edited or original) images are
        from the warped targets."""
        if self.unmixed is None:
            original = self.G.synthesis(self.ws, noise_mode="const", clamp=False)
            self.unmixed = (original, warp_images(original, self.plan.grids))
        original, target = self.unmixed
        return float(self.loss(self.synthesize(self.ws) if edited else original, target))


class WarpEditor:
    """`zoo edit warp`: the GAN-warping editor plugin (entry point `warp`)."""

    name: ClassVar[str] = "warp"
    families: ClassVar[tuple[str, ...]] = ("gan",)
    request_type: ClassVar[type] = WarpRequest

    def edit(self, model: LoadedModel, request: Any, progress: EditProgress | None = None) -> EditResult:
        if isinstance(request, Mapping):
            request = WarpRequest.from_json(request)
        if not isinstance(request, WarpRequest):
            raise BadInput(f"the warp editor takes a WarpRequest or its JSON, got {type(request).__name__}")
        G: Generator = model.pipeline
        plan = plan_warp(G, request)
        fit = WarpFit(G, plan, request)
        before = fit.fit_error(edited=False)
        losses = fit.run(progress)
        after = fit.fit_error(edited=True)
        with torch.no_grad():
            changed = {u.layer + ".weight": u.weight().clone().contiguous() for u in fit.updates}
            factors = {u.layer + ".weight": u.factors() for u in fit.updates}
            relative = {u.layer: round(float(u.delta().norm() / u.W0.norm()), 6) for u in fit.updates}
        params = {
            "layers": plan.layers,
            "rank": request.rank,
            "iterations": request.iterations,
            "lr": request.lr,
            "lr_schedule": request.lr_schedule,
            "loss": request.loss,
            "batch_size": request.batch_size,
            "style_mixing": request.style_mixing,
            "mix_from": plan.mix_from,
            "hold_corners": request.hold_corners,
            "seed": request.seed,
        }
        metrics = {
            "samples": len(request.samples),
            "fit_loss_before": round(before, 6),
            "fit_loss_after": round(after, 6),
            "first_loss": round(losses[0], 6),
            "last_loss": round(float(np.mean(losses[-10:])), 6),
            "delta_relative_norm": relative,
        }
        return EditResult(changed=changed, params=params, metrics=metrics, factors=factors)
