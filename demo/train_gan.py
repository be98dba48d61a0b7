"""Train a small StyleGAN2 generator on one slice of the shapes world (e.g. red circles) on a CPU.

The GAN editors (GAN warping) and GAN search need trained generators whose outputs can be measured,
and no hub checkpoint can be downloaded, so the shapes world trains its own: one generator per slice
(one shape in one colour, random position and size, drawn at aspect 1.0 so a later horizontal stretch
shows up in `aspect_ratios_of`), scored with the analytic meters of `modelzoo.demo.meters`.

The generator is `modelzoo.registry.families.stylegan.Generator`, unchanged, so what is trained here is
exactly what the registry stores and the editors load. The discriminator and the training loop follow
StyleGAN2 (Karras et al., CVPR 2020) as stylegan2-ada-pytorch implements them (`training/networks.py`
resnet discriminator, `training/loss.py` StyleGAN2Loss, `training/training_loop.py`), shrunk to what a
2-core CPU trains in about a minute:

- Non-saturating logistic loss (Goodfellow et al. 2014): L_G = softplus(-D(G(z))) and
  L_D = softplus(D(G(z))) + softplus(-D(x)).
- R1 regularisation (Mescheder et al. 2018, eq. 9): gamma / 2 * E_x ||grad_x D(x)||^2 on real images,
  lazily every `r1_interval` discriminator steps and multiplied by the interval (StyleGAN2 sec. 4, "lazy
  regularisation"); Adam's learning rate and betas are adjusted by c = interval / (interval + 1) so the
  regularised optimiser takes the same steps on average.
- Style mixing regularisation (StyleGAN, Karras et al. 2019, sec. 3.1): with probability `mixing_prob`
  the styles from a random cutoff on come from a second latent.
- Adam with betas (0, 0.99), and an exponential moving average of the generator's weights (G_ema,
  half-life `ema_kimg` thousand images, ramped up over the first `ema_rampup` of training) that is the
  generator returned: on short runs the average is much steadier than the last step.
- No path-length regulariser and no augmentation: the first doubles the generator's cost, and the
  second is not needed when fresh images can be drawn for free.

What was measured (red circles, 2 loaded cores, 1 thread) and chose the defaults:
- With R1 gamma 0.1 every 4 steps the discriminator won outright (its loss fell to 0.003) after about
  300 steps and the generator collapsed to flat grey: agreement 0.89 at step 200, 0.00 at 400-600.
  gamma 1.0, lazily every 16 steps, keeps both losses near 1 instead.
- Anywhere-in-the-image positions made the generator collapse onto one position in turn and oscillate
  (agreement 0.94 at step 700, 0.07 at 800): a StyleGAN2 starts from a fixed 4x4 constant and moves
  things only slowly. Training shapes are therefore centred, offset by up to `position_jitter` (6% of
  the side, about 2 px) on each axis, with the world's size range; the slice's colour and shape, and
  aspect 1.0, are what the GAN editors and search need.
- Batch 16 halves a step's cost with about the same progress per step. Squares' corners and stars'
  points appear late (yellow stars: 0.00 at step 700, 0.90 at 900, 0.96 at 1000), hence 1000 steps
  with 16 channels at 32x32 in G and D; with 8 they stayed round blobs.
- Measured with seed 0 (agreement; about 60 s each, two runs sharing 2 cores): full red circle 1.00,
  blue square 1.00, green triangle 1.00, yellow star 0.96, red square 0.985, blue circle 0.995. Quick
  (about 5 s): red circle 0.395, blue square 0.415; quick squares are seed-dependent (0.1-0.4), circles
  less so (0.4-0.8).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelzoo.demo.meters import measure
from modelzoo.demo.shapes import COLOURS, MARGIN, SHAPES, render, sample_specs
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.gan import images_to_uint8, save_gan
from modelzoo.registry.families.stylegan import (
    LRELU_GAIN,
    LRELU_SLOPE,
    FullyConnectedLayer,
    Generator,
    StyleGanConfig,
    build,
    latents_for_seeds,
)

Progress = Callable[[int, int, float], None]
"""Called after every training step with (steps done, total steps, seconds since training began)."""

GAN_CONFIG = replace(StyleGanConfig.tiny(), channel_base=512, channel_max=64)
"""`StyleGanConfig.tiny()` with half the channels at 16x16 and 32x32 (64, 64, 32, 16 at 4, 8, 16, 32):
the 32x32 layers dominate the cost, and one flat-coloured shape needs few channels there. A quarter
(channel_base 256: 8 channels at 32x32) learns circles but rounds off corners, so squares and stars fail."""

QUICK_GAN_CONFIG = replace(GAN_CONFIG, channel_base=256)
"""The quick profile's smaller generator (64, 32, 16, 8 channels): enough for the quick bar in seconds."""

METER_SAMPLES = 200
"""Samples scored after training: seeds 0..199, the registry's `latents_for_seeds` latents."""


@dataclass(frozen=True)
class TrainingProfile:
    """How long and how hard to train; `PROFILES` holds the named ones.

    Steps, not seconds, bound training, so a seed gives the same generator on a busy or an idle
    machine. `dataset_size` images are drawn once before training and batches are drawn from them.
    """

    name: str
    steps: int
    batch_size: int = 16
    g_lr: float = 0.0025
    d_lr: float = 0.0025
    r1_gamma: float = 1.0
    r1_interval: int = 16
    mixing_prob: float = 0.0
    ema_kimg: float = 1.0
    ema_rampup: float = 0.05
    dataset_size: int = 4096
    size_range: tuple[float, float] = (0.4, 0.75)
    rotate: bool = False
    """Rotate training shapes at random; off by default, since upright shapes are learnt much faster and
    the aspect-ratio meter reads the same either way."""
    position_jitter: float | None = 0.06
    """Largest offset of a training shape's centre from the image centre, per axis, as a fraction of the
    side; None draws positions anywhere, as the world does (see the module notes)."""
    d_channel_base: int = 512
    d_channel_max: int = 64
    mbstd_group: int = 4
    translate: int = 0
    """DiffAugment-style translation (Zhao et al. 2020): every image D sees, real or fake, is shifted by
    up to this many pixels on each axis (filled with background grey), differentiably."""
    generator: StyleGanConfig = field(default=GAN_CONFIG)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 4 or self.batch_size % 4:
            raise BadInput(f"a profile needs steps >= 1 and a batch size that is a multiple of 4, got {self}")


PROFILES: dict[str, TrainingProfile] = {
    "full": TrainingProfile("full", steps=1000),
    "quick": TrainingProfile(
        "quick", steps=100, g_lr=0.004, d_lr=0.004, d_channel_base=256, generator=QUICK_GAN_CONFIG
    ),
}


@dataclass
class TrainedGan:
    """A trained generator (G_ema, eval mode, w_avg estimated), its config, and what the meters read.

    `metrics`: `agreement` (share of samples whose colour AND shape meters equal the slice),
    `colour_agreement`, `shape_agreement`, `aspect_mean` (mean width/height of the samples that have a
    foreground), the same for the training images (`data_*`, the ceiling), and `steps` and `seconds`.
    """

    generator: Generator
    config: StyleGanConfig
    metrics: dict[str, float | int | str]


class Conv2dLayer(nn.Module):
    """Conv with equalized learning rate (weights N(0, 1), scaled by 1/sqrt(fan_in) at run time) and
    leaky ReLU; `gain` scales the output, as officially. With `down`, a 2x average pool comes first, so
    the conv runs at the lower resolution, as the official filter-then-stride-2 conv does."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        lrelu: bool = True,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel * kernel)
        self.lrelu = lrelu
        self.down = down

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        if self.down:
            x = F.avg_pool2d(x, 2)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.weight.shape[-1] // 2)
        if self.lrelu:
            x = F.leaky_relu(x, LRELU_SLOPE) * LRELU_GAIN
        return x * gain if gain != 1 else x


class DiscriminatorBlock(nn.Module):
    """Residual block that halves the resolution: two 3x3 convs beside a 1x1 skip, summed with gain
    sqrt(1/2) each so the output keeps unit variance (stylegan2-ada's `architecture='resnet'`)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = Conv2dLayer(in_channels, in_channels, 3)
        self.conv1 = Conv2dLayer(in_channels, out_channels, 3, down=True)
        self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, lrelu=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        gain = math.sqrt(0.5)
        return self.skip(x, gain) + self.conv1(self.conv0(x), gain)


class Discriminator(nn.Module):
    """fromRGB, residual blocks down to 4x4, then minibatch standard deviation, a conv and two linear layers.

    The minibatch-std feature (Karras et al. 2018, sec. 3) lets the discriminator see a batch's lack of
    variety, which is what keeps a short run from collapsing onto one position and size.
    Channels at resolution R are min(channel_base // R, channel_max), as in the generator.
    """

    def __init__(
        self, resolution: int, channel_base: int, channel_max: int, img_channels: int = 3, mbstd_group: int = 4
    ) -> None:
        super().__init__()
        self.mbstd_group = mbstd_group

        def channels(res: int) -> int:
            return min(channel_base // res, channel_max)

        self.from_rgb = Conv2dLayer(img_channels, channels(resolution), 1)
        blocks = []
        res = resolution
        while res > 4:
            blocks.append(DiscriminatorBlock(channels(res), channels(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        c4 = channels(4)
        self.conv = Conv2dLayer(c4 + 1, c4, 3)
        self.fc = FullyConnectedLayer(c4 * 16, c4, lrelu=True)
        self.out = FullyConnectedLayer(c4, 1)

    @staticmethod
    def minibatch_std(x: Tensor, group_size: int = 4) -> Tensor:
        """Append one channel: the mean over features of the std over each group of `group_size` samples."""
        n, c, h, w = x.shape
        g = min(group_size, n)
        y = x.reshape(g, n // g, c, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
        return torch.cat([x, y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w)], dim=1)

    def forward(self, img: Tensor) -> Tensor:
        """Images (N, C, R, R) in [-1, 1] -> logits (N,); N must be a multiple of 4 (or below 4)."""
        x = self.blocks(self.from_rgb(img))
        x = self.conv(self.minibatch_std(x, self.mbstd_group))
        return self.out(self.fc(x.flatten(1))).squeeze(1)


def slice_images(
    shape: str,
    colour: str,
    n: int,
    seed: int,
    resolution: int,
    size_range: tuple[float, float],
    rotate: bool,
    position_jitter: float | None = None,
) -> np.ndarray:
    """`n` training images (N, H, W, 3) uint8 of one slice: random size, aspect 1.0.

    Positions are the world's (`sample_specs`: anywhere the shape fits) when `position_jitter` is None;
    otherwise the centre is offset from the image centre by up to +-`position_jitter` of the side on
    each axis (less where the shape would leave the margin).
    """
    if shape not in SHAPES or colour not in COLOURS:
        raise BadInput(f"no slice {colour!r} {shape!r}: shapes are {', '.join(SHAPES)}, colours {', '.join(COLOURS)}")
    specs = sample_specs(n, seed, shapes=(shape,), colours=(colour,), size_range=size_range, rotate=rotate)
    if position_jitter is not None:
        offsets = np.random.default_rng([seed, 2]).uniform(-1.0, 1.0, (n, 2))
        centred = []
        for spec, (ox, oy) in zip(specs, offsets, strict=True):
            room = max(0.0, min(position_jitter, 0.5 - MARGIN - spec.size / 2))
            centred.append(replace(spec, cx=0.5 + ox * room, cy=0.5 + oy * room))
        specs = centred
    return render(specs, resolution)


def _to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the inverse of `images_to_uint8`."""
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - 128) / 127.5


def _styles(G: Generator, batch: int, mixing_prob: float, rng: torch.Generator) -> Tensor:
    """ws (N, num_ws, w_dim) for fresh latents; with probability `mixing_prob` a sample's styles from a
    random cutoff on come from a second latent (style mixing regularisation)."""
    ws = G.mapping(torch.randn(batch, G.z_dim, generator=rng))
    if mixing_prob > 0:
        ws2 = G.mapping(torch.randn(batch, G.z_dim, generator=rng))
        cutoff = torch.randint(1, G.num_ws, (batch, 1), generator=rng)
        cutoff = torch.where(torch.rand(batch, 1, generator=rng) < mixing_prob, cutoff, G.num_ws)
        mixed = torch.arange(G.num_ws)[None, :] >= cutoff
        ws = torch.where(mixed[..., None], ws2, ws)
    return ws


def _translate(images: Tensor, pixels: int, rng: torch.Generator) -> Tensor:
    """Shift each image by a random integer offset in [-pixels, pixels] on each axis, filling with 0 (grey)."""
    if pixels <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (pixels, pixels, pixels, pixels))
    offsets = torch.randint(0, 2 * pixels + 1, (n, 2), generator=rng).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def _update_ema(G_ema: Generator, G: Generator, beta: float) -> None:
    for p_ema, p in zip(G_ema.parameters(), G.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)


def sample_images(G: Generator, seeds: list[int], truncation_psi: float = 1.0) -> np.ndarray:
    """uint8 (N, H, W, 3) images for `seeds`, as the registry samples them (const noise), in one batch."""
    with torch.no_grad():
        return images_to_uint8(G(latents_for_seeds(seeds, G.z_dim), truncation_psi=truncation_psi))


def slice_metrics(images: np.ndarray, shape: str, colour: str, prefix: str = "") -> dict[str, float]:
    """Share of images whose colour meter, shape meter, and both, read the slice; mean aspect ratio."""
    readings = measure(images)
    colour_ok = np.array([r.colour == colour for r in readings])
    shape_ok = np.array([r.shape == shape for r in readings])
    aspects = np.array([r.aspect for r in readings])
    return {
        f"{prefix}agreement": float((colour_ok & shape_ok).mean()),
        f"{prefix}colour_agreement": float(colour_ok.mean()),
        f"{prefix}shape_agreement": float(shape_ok.mean()),
        f"{prefix}aspect_mean": float(np.nanmean(aspects)) if np.isfinite(aspects).any() else math.nan,
    }


class GanTrainer:
    """The training state of one slice's GAN: data, G, D, G_ema, optimisers and the seeded RNG.

    `step()` runs one generator update, one discriminator update (with R1 every `r1_interval` steps)
    and one G_ema update; `train_gan` calls it `profile.steps` times. Kept as an object so experiments
    can measure G_ema between steps.
    """

    def __init__(self, shape: str, colour: str, seed: int, profile: TrainingProfile) -> None:
        self.profile = profile
        config = profile.generator
        self.data = slice_images(
            shape, colour, profile.dataset_size, seed, config.resolution, profile.size_range, profile.rotate,
            profile.position_jitter,
        )
        self.reals = _to_tensor(self.data)
        self.G = build(config, seed).train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.D = Discriminator(
                config.resolution, profile.d_channel_base, profile.d_channel_max, config.img_channels,
                profile.mbstd_group,
            )
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        c = profile.r1_interval / (profile.r1_interval + 1)
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=profile.g_lr, betas=(0.0, 0.99), eps=1e-8)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=profile.d_lr * c, betas=(0.0, 0.99**c), eps=1e-8)
        self.rng = torch.Generator().manual_seed(seed)
        self.steps_done = 0

    def step(self) -> tuple[float, float]:
        """One D, G and G_ema update; returns (generator loss, discriminator loss before R1).

        One batch of fakes serves both updates (detached for D's, then through the updated D for G's),
        which saves a third of the generator's cost per step.
        """
        p, G, D = self.profile, self.G, self.D
        fake = G.synthesis(_styles(G, p.batch_size, p.mixing_prob, self.rng), clamp=False)

        D.requires_grad_(True)
        real = self.reals[torch.randint(len(self.reals), (p.batch_size,), generator=self.rng)]
        real = _translate(real, p.translate, self.rng)
        fake = _translate(fake, p.translate, self.rng)
        do_r1 = self.steps_done % p.r1_interval == 0
        real.requires_grad_(do_r1)
        real_logits = D(real)
        loss_D = F.softplus(D(fake.detach())).mean() + F.softplus(-real_logits).mean()
        loss = loss_D
        if do_r1:
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            loss = loss + grad.square().sum(dim=(1, 2, 3)).mean() * (p.r1_gamma / 2 * p.r1_interval)
        self.opt_D.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_D.step()

        D.requires_grad_(False)
        loss_G = F.softplus(-D(fake)).mean()
        self.opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        self.opt_G.step()

        self.steps_done += 1
        ema_nimg = min(p.ema_kimg * 1000, self.steps_done * p.batch_size * p.ema_rampup)
        _update_ema(self.G_ema, G, 0.5 ** (p.batch_size / max(ema_nimg, 1e-8)))
        return float(loss_G.detach()), float(loss_D.detach())


def train_gan(
    shape: str,
    colour: str,
    seed: int = 0,
    profile: str | TrainingProfile = "full",
    progress: Progress | None = None,
) -> TrainedGan:
    """Train a generator on `colour` `shape` images and measure 200 of its samples with the meters.

    Deterministic for the seed (and thread count): weights, latents and batches come from seeded
    generators, and training uses the stored ("const") noise that sampling uses, never the global RNG.
    """
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise BadInput(f"unknown training profile {profile!r}; choose one of {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    trainer = GanTrainer(shape, colour, seed, profile)
    start = time.perf_counter()
    for _ in range(profile.steps):
        trainer.step()
        if progress is not None:
            progress(trainer.steps_done, profile.steps, time.perf_counter() - start)
    seconds = time.perf_counter() - start

    G = trainer.G_ema
    G.mapping.estimate_w_avg(seed=seed)
    metrics: dict[str, float | int | str] = {
        "slice": f"{colour} {shape}",
        "profile": profile.name,
        "steps": profile.steps,
        "seconds": round(seconds, 2),
        "samples": METER_SAMPLES,
    }
    metrics |= slice_metrics(sample_images(G, list(range(METER_SAMPLES))), shape, colour)
    metrics |= slice_metrics(trainer.data[:METER_SAMPLES], shape, colour, prefix="data_")
    return TrainedGan(generator=G, config=profile.generator, metrics=metrics)


def save(trained: TrainedGan, directory: str | Path) -> Path:
    """Write the generator as a GAN folder (config.json + model.safetensors) that `zoo import` reads."""
    return save_gan(trained.generator, trained.config, directory)
