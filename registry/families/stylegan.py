"""A StyleGAN2 generator in one file, with the official checkpoints' tensor names.

Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020), as implemented by
NVlabs/stylegan2-ada-pytorch (`training/networks.py`, `architecture='skip'`, the default). Written
for reading and for editors that rewrite one convolution, not for training speed: no fp16, no fused
CUDA ops, no conditioning labels (`c_dim = 0`).

Structure (N latents, L = log2(resolution), num_ws = 2 L - 2 style vectors per image):

    z (N, z_dim) --mapping--> w (N, w_dim) --broadcast, truncate--> ws (N, num_ws, w_dim)
    ws --synthesis--> image (N, img_channels, resolution, resolution)

`synthesis.b4` starts from a learned constant and has one conv (`conv1`); every later block `bR`
(R = 8, 16, ..., resolution) has `conv0` (upsamples 2x) and `conv1`. Every block has a `torgb` whose
output is added to the 2x-upsampled image so far (the "skip" generator). Block `bR` reads its convs'
styles from ws[k], ws[k + 1] and its `torgb` style from the next one, which the next block's first
conv shares, exactly as the official network does.

Tensor names ARE the official ones, so `official_to_local` is the identity except that it drops the
`resample_filter` buffers (fixed [1, 3, 3, 1] filters, rebuilt here on the fly):

    mapping.fc{i}.weight (w_dim, in), mapping.fc{i}.bias (w_dim,)   i < mapping_layers
    mapping.w_avg (w_dim,)
    synthesis.b4.const (C4, 4, 4)
    synthesis.bR.conv{0,1}.weight (C_out, C_in, 3, 3)   the base weight that modulation scales
    synthesis.bR.conv{0,1}.affine.weight (C_in, w_dim), .affine.bias (C_in,)
    synthesis.bR.conv{0,1}.noise_strength (), .noise_const (R, R), .bias (C_out,)
    synthesis.bR.torgb.weight (img_channels, C, 1, 1), .affine.weight, .affine.bias, .bias
    dropped: synthesis.bR.resample_filter, synthesis.bR.conv{0,1}.resample_filter (4, 4)

with C_R = min(channel_base // R, channel_max). Upsampling uses the official low-pass filter (zero
insertion followed by the separable [1, 3, 3, 1] FIR filter, which is bilinear interpolation away from
the border), so a converted checkpoint reproduces the official images, not just their shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelzoo.registry.errors import BadInput

NoiseMode = Literal["const", "random", "none"]
NOISE_MODES: tuple[str, ...] = ("const", "random", "none")

# The official generator's leaky ReLU: slope 0.2, then a gain of sqrt(2) that keeps unit variance.
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


@dataclass(frozen=True)
class StyleGanConfig:
    """Everything that decides a generator's tensor shapes; plain data that round-trips through JSON.

    Channels at resolution R are min(channel_base // R, channel_max), as in the official code.
    `mapping_lr_multiplier` is part of the architecture, not only of training: equalized learning
    rate stores the mapping weights divided by it and multiplies them back at run time.
    `conv_clamp` clamps every conv output to +-conv_clamp; models trained with stylegan2-ada's own
    configs use 256, models converted from the TensorFlow release use None.
    """

    z_dim: int
    w_dim: int
    resolution: int
    img_channels: int = 3
    mapping_layers: int = 8
    channel_base: int = 32768
    channel_max: int = 512
    mapping_lr_multiplier: float = 0.01
    conv_clamp: float | None = None

    def __post_init__(self) -> None:
        res = self.resolution
        if res < 4 or res & (res - 1):
            raise BadInput(f"StyleGAN resolution must be a power of two >= 4, got {res}")
        for name in ("z_dim", "w_dim", "img_channels", "mapping_layers", "channel_base", "channel_max"):
            if getattr(self, name) < 1:
                raise BadInput(f"StyleGanConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.channels(res) < 1:
            raise BadInput(f"channel_base {self.channel_base} leaves no channels at {res}x{res}")

    def channels(self, res: int) -> int:
        return min(self.channel_base // res, self.channel_max)

    @property
    def block_resolutions(self) -> tuple[int, ...]:
        return tuple(2**i for i in range(2, int(math.log2(self.resolution)) + 1))

    @property
    def num_ws(self) -> int:
        """One style per conv (1 at 4x4, 2 per later block) plus one for the last toRGB."""
        return 2 * len(self.block_resolutions)

    def to_dict(self) -> dict[str, int | float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> StyleGanConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"unknown StyleGanConfig fields {unknown}; expected a subset of {sorted(known)}")
        try:
            return cls(**data)  # type: ignore[arg-type]
        except TypeError as exc:
            raise BadInput(f"bad StyleGanConfig {dict(data)}: {exc}") from exc

    @classmethod
    def tiny(cls) -> StyleGanConfig:
        """32x32, at most 64 channels, 2 mapping layers: builds and runs in milliseconds on a CPU."""
        return cls(z_dim=64, w_dim=64, resolution=32, mapping_layers=2, channel_base=1024, channel_max=64)

    @classmethod
    def stylegan2_256(cls) -> StyleGanConfig:
        """StyleGAN2 config-f at 256x256, the shape of the official LSUN cat/church/horse generators.

        channel_base is 32768 because stylegan2-ada-pytorch's `legacy.py` converts the TensorFlow
        config-f models (fmap_base 16384, indexed by stage rather than resolution) to 32768, and the
        GAN-warping and rewriting papers edit those models. The ada repository's own `--cfg=paper256`
        models (e.g. its FFHQ-256 transfer sources) use half the channels: pass channel_base=16384 and
        conv_clamp=256 via `dataclasses.replace` for those.
        """
        return cls(z_dim=512, w_dim=512, resolution=256)


def latents_for_seeds(seeds: Sequence[int], z_dim: int) -> Tensor:
    """The one definition of "the latent for seed s": float32 (len(seeds), z_dim), row i from seeds[i].

    Each row comes from its own `np.random.RandomState(s)`, so it does not depend on the batch it is
    in, and it equals the z that the official `generate.py --seeds` draws, so seed 42 here and there
    names the same image.
    """
    rows = []
    for seed in seeds:
        if not 0 <= seed < 2**32:
            raise BadInput(f"seeds must be integers in [0, 2**32), got {seed}")
        rows.append(np.random.RandomState(seed).randn(z_dim))
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, z_dim))).float()


def modulate_weight(weight: Tensor, styles: Tensor, demodulate: bool = True) -> Tensor:
    """Per-sample conv weights, (N, O, I, kh, kw), from a base weight (O, I, kh, kw) and styles (N, I).

    Paper eq. 1-3, i input channel, j output channel, k kernel position:
        (1) w'_ijk = s_i * w_ijk                           modulation by the style s = affine(w)
        (2) sigma_j = sqrt(sum_{i,k} w'_ijk^2)             std of output j for unit-variance i.i.d. input
        (3) w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps)   demodulation restores unit std
    """
    w = weight.unsqueeze(0) * styles[:, None, :, None, None]
    if demodulate:
        w = w * (w.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    return w


def upsample2x(x: Tensor, margin: int = 0) -> Tensor:
    """2x upsampling with the official low-pass filter: zero insertion, then [1, 3, 3, 1] x [1, 3, 3, 1] / 16.

    Away from the border this is bilinear interpolation; outside the input it sees zeros. `margin`
    extra rows and columns (at most 1) are kept on each side for a following unpadded convolution, so
    that convolution sees the same values the official transposed convolution would.
    """
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype, device=x.device)
    f = torch.outer(taps, taps) / 16
    channels = x.shape[1]
    return F.conv_transpose2d(x, f.expand(channels, 1, 4, 4), stride=2, padding=1 - margin, groups=channels)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, up: bool = False) -> Tensor:
    """Modulated convolution as one grouped convolution: sample n's input convolved with its own weight.

    With `up`, the input is upsampled 2x first and the kernel flipped: the official network convolves
    (rather than correlates) in its upsampling layers, and a checkpoint's weights assume that.
    """
    n, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    w = modulate_weight(weight, styles, demodulate)
    if up:
        x = upsample2x(x, margin=kh // 2)
        w = w.flip((3, 4))
        padding = 0
    else:
        padding = kh // 2
    x = x.reshape(1, n * in_channels, *x.shape[2:])
    y = F.conv2d(x, w.reshape(n * out_channels, in_channels, kh, kw), padding=padding, groups=n)
    return y.reshape(n, out_channels, *y.shape[2:])


def _clamp(x: Tensor, limit: float | None) -> Tensor:
    return x if limit is None else x.clamp(-limit, limit)


class FullyConnectedLayer(nn.Module):
    """A linear layer with equalized learning rate (Karras et al. 2018, sec. 4.1).

    The stored weight is N(0, 1) / lr_multiplier and is scaled by lr_multiplier / sqrt(in_features) at
    run time, so every layer learns at the same rate and the mapping network 100x slower (0.01).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        lrelu: bool = False,
        lr_multiplier: float = 1.0,
        bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        self.lrelu = lrelu
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.bias_gain)
        return F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN if self.lrelu else x


class MappingNetwork(nn.Module):
    """z -> w: normalise z's second moment, then `num_layers` leaky-ReLU layers; broadcast and truncate.

    `w_avg` is the mean w, the centre that truncation pulls towards. The official trainer updates it as
    a moving average in training mode; here it never changes behind an editor's back (an editor that
    calls `.train()` would otherwise commit a drifted w_avg): trained checkpoints bring their own, and
    `estimate_w_avg` computes one for a generator trained elsewhere.
    """

    def __init__(self, config: StyleGanConfig) -> None:
        super().__init__()
        self.z_dim = config.z_dim
        self.w_dim = config.w_dim
        self.num_ws = config.num_ws
        self.num_layers = config.mapping_layers
        for idx in range(config.mapping_layers):
            in_features = config.z_dim if idx == 0 else config.w_dim
            layer = FullyConnectedLayer(
                in_features, config.w_dim, lrelu=True, lr_multiplier=config.mapping_lr_multiplier
            )
            self.add_module(f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros(config.w_dim))

    def embed(self, z: Tensor) -> Tensor:
        """z (N, z_dim) -> w (N, w_dim), before broadcasting and truncation."""
        x = z.to(self.w_avg)  # the generator's dtype and device: latents come as float32 on the CPU
        x = x * (x.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        for idx in range(self.num_layers):
            x = self.get_submodule(f"fc{idx}")(x)
        return x

    def forward(self, z: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None) -> Tensor:
        """ws (N, num_ws, w_dim); ws[:, :cutoff] = w_avg + psi (w - w_avg), all ws when cutoff is None."""
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise BadInput(f"z must have shape (N, {self.z_dim}), got {tuple(z.shape)}")
        ws = self.embed(z).unsqueeze(1).repeat(1, self.num_ws, 1)
        if truncation_psi != 1:
            cutoff = self.num_ws if truncation_cutoff is None else truncation_cutoff
            truncated = self.w_avg.lerp(ws[:, :cutoff], truncation_psi)
            ws = torch.cat([truncated, ws[:, cutoff:]], dim=1)
        return ws

    @torch.no_grad()
    def estimate_w_avg(self, num_samples: int = 10_000, seed: int = 0) -> None:
        """Set w_avg to the mean w of `num_samples` seeded z, for a generator that did not track it."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(num_samples, self.z_dim, generator=generator).to(self.w_avg)  # seeded CPU draw
        self.w_avg.copy_(self.embed(z).mean(dim=0))


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling) + per-pixel noise + bias + leaky ReLU.

    Noise is one (resolution, resolution) map broadcast over channels, scaled by the learned
    `noise_strength`: 'const' uses the stored `noise_const` buffer (deterministic, part of the
    checkpoint), 'random' draws fresh noise from torch's global RNG, 'none' adds nothing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        up: int = 1,
        conv_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.resolution = resolution
        self.up = up
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise_mode: NoiseMode = "const") -> Tensor:
        x = modulated_conv2d(x, self.weight, self.affine(w), up=self.up == 2)
        if noise_mode == "const":
            x = x + self.noise_const * self.noise_strength
        elif noise_mode == "random":
            res = self.resolution
            x = x + torch.randn(x.shape[0], 1, res, res, device=x.device, dtype=x.dtype) * self.noise_strength
        x = F.leaky_relu(x + self.bias[:, None, None], LRELU_SLOPE) * LRELU_GAIN
        return _clamp(x, self.conv_clamp)


class ToRGBLayer(nn.Module):
    """Modulated 1x1 conv to image channels, without demodulation (colour scale must stay free).

    Its styles carry the equalized-learning-rate gain 1 / sqrt(in_channels) that demodulation would
    otherwise have made irrelevant.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: float | None = None) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return _clamp(x + self.bias[:, None, None], self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: (const | conv0 up 2x) -> conv1 -> torgb, added to the upsampled image so far."""

    def __init__(self, config: StyleGanConfig, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.in_channels = 0 if resolution == 4 else config.channels(resolution // 2)
        out_channels = config.channels(resolution)
        w_dim, clamp = config.w_dim, config.conv_clamp
        if self.in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(self.in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=clamp)
        self.torgb = ToRGBLayer(out_channels, config.img_channels, w_dim, conv_clamp=clamp)
        self.num_conv = 1 if self.in_channels == 0 else 2
        self.num_torgb = 1

    def forward(
        self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: NoiseMode = "const"
    ) -> tuple[Tensor, Tensor]:
        """ws (N, num_conv + 1, w_dim) -> (features, image) at this block's resolution."""
        if x is None:
            x = self.const.unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0], noise_mode)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
            x = self.conv1(x, ws[:, 1], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample2x(img) + y
        return x, img


class SynthesisNetwork(nn.Module):
    """ws -> image through blocks b4, b8, ..., b{resolution}."""

    def __init__(self, config: StyleGanConfig) -> None:
        super().__init__()
        self.w_dim = config.w_dim
        self.num_ws = config.num_ws
        self.block_resolutions = config.block_resolutions
        for res in self.block_resolutions:
            self.add_module(f"b{res}", SynthesisBlock(config, res))

    def forward(self, ws: Tensor, noise_mode: NoiseMode = "const", clamp: bool = True) -> Tensor:
        """Images (N, img_channels, R, R), nominally in [-1, 1].

        `clamp=True` clamps to [-1, 1]. The official network returns the raw sum; pass clamp=False to
        optimise a loss through the image, since a clamp zeroes the gradient of saturated pixels.
        """
        if ws.ndim != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise BadInput(f"ws must have shape (N, {self.num_ws}, {self.w_dim}), got {tuple(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise BadInput(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        ws = ws.to(next(self.parameters()))  # the network's dtype and device
        x = img = None
        w_idx = 0
        for res in self.block_resolutions:
            block = self.get_submodule(f"b{res}")
            x, img = block(x, img, ws[:, w_idx : w_idx + block.num_conv + block.num_torgb], noise_mode)
            w_idx += block.num_conv
        assert img is not None
        return img.clamp(-1, 1) if clamp else img


class Generator(nn.Module):
    """StyleGAN2 generator: `mapping` (z -> ws) then `synthesis` (ws -> image)."""

    def __init__(self, config: StyleGanConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.w_dim = config.w_dim
        self.img_resolution = config.resolution
        self.img_channels = config.img_channels
        self.num_ws = config.num_ws
        self.synthesis = SynthesisNetwork(config)
        self.mapping = MappingNetwork(config)

    def forward(
        self,
        z: Tensor,
        truncation_psi: float = 1.0,
        noise_mode: NoiseMode = "const",
        truncation_cutoff: int | None = None,
        clamp: bool = True,
    ) -> Tensor:
        ws = self.mapping(z, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff)
        return self.synthesis(ws, noise_mode=noise_mode, clamp=clamp)

    def layer_names(self) -> list[str]:
        """The modulated 3x3 convs in forward order: synthesis.b4.conv1, synthesis.b8.conv0, ...

        Position in this list is the "layer index" of GAN warping (PeterWang512/GANWarping), whose
        `get_stylegan2_modules` lists the same modules in the same order.
        """
        return [name for name, module in self.named_modules() if isinstance(module, SynthesisLayer)]


def build(config: StyleGanConfig, seed: int = 0) -> Generator:
    """A freshly initialised generator; the same seed gives the same weights and noise buffers.

    Seeds a forked RNG, so the caller's global RNG state is untouched. Works under
    `with torch.device("meta"):` for shape-only models at full size.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Generator(config)


def official_to_local(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Names are shared with stylegan2-ada-pytorch; only the fixed `resample_filter` buffers are dropped."""
    if any(key.startswith("mapping.embed.") for key in state_dict):
        raise BadInput("this is a conditional StyleGAN2 (mapping.embed.*); only c_dim = 0 generators load")
    return {key: value for key, value in state_dict.items() if not key.endswith("resample_filter")}


def local_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Add back the `resample_filter` buffers the official modules register, so strict loading works."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    resample_filter = torch.outer(taps, taps) / 64
    out = dict(state_dict)
    for key in state_dict:
        if key.startswith("synthesis.") and key.endswith((".conv0.weight", ".conv1.weight")):
            layer = key.removesuffix(".weight")
            out[f"{layer}.resample_filter"] = resample_filter.clone()
            out[f"{layer.rsplit('.', 1)[0]}.resample_filter"] = resample_filter.clone()
    return out
