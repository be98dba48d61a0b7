"""Train a small text-to-image diffusion model on the shapes world, on CPU, as a standard SD pipeline.

`train_diffusion(out_dir)` trains on captioned shapes-world images ("a red circle": 4 shapes x 4 basic
colours), saves a `StableDiffusionPipeline` with `save_pretrained`, loads it back with
`DiffusionPipeline.from_pretrained` and measures it with the pipeline's defaults (`pipe("a red circle")`:
50 steps, guidance 7.5, 16 x 16 images): colour and shape agreement read back by `modelzoo.demo.meters`.

The pipeline (every component a stock diffusers / transformers class, so editors and the registry treat
it like any SD 1.x folder):
- `AutoencoderKL` without downsampling, *built* as an exact identity rather than trained: the latent is
  the image itself (3 channels, 16 x 16), decode(encode(x)) = x to within 0.01 / 255. Convolutions
  copy each RGB channel and its negative into the hidden channels next to two constants +-K; the
  constants fix every GroupNorm's statistics (mean exactly 0, variance K^2 / 4 up to 1e-4), and the
  pairs pass SiLU linearly, since SiLU(u) - SiLU(-u) = u; every ResNet's last convolution is zero, so
  the blocks are identities. A learned 2x-downsampling VAE would cost training time and add
  reconstruction error for no gain: at 16 x 16 pixel-space diffusion is already cheap.
- `UNet2DConditionModel` (0.26M parameters) with two levels: ResNets only at 16 x 16 (width 16), ResNets
  with cross-attention transformer blocks at 8 x 8 (width 32) and in the 8 x 8 mid block. The text
  reaches the UNet only through cross-attention, which UCE and ESD edit. Attention at 16 x 16 made a
  step 2.7x slower.
- `CLIPTextModel` (2 layers, width 64), trained from scratch with the UNet, and a `CLIPTokenizer` with
  the first 8,000 of CLIP's merges (every shapes-world word but "triangle" is then one token; 8,514
  tokens) and 16 positions, enough for every caption template.
- `DDIMScheduler` with DDPM's linear betas, v-prediction and "trailing" timesteps, so the first of the
  50 sampling steps starts from pure noise (alpha_bar = 4e-5), as training saw.

Training choices, by measurement (colour / shape agreement of 32 or 64 default samples, on 2 shared
cores):
- v-prediction instead of epsilon: 400 steps reached 100% colour agreement instead of 34%. Epsilon
  prediction leaves x0 = (x_t - sigma eps) / alpha badly conditioned at the high noise levels where
  the colour is decided.
- Latents scaled to unit variance (`scaling_factor` 3 ~= 1 / 0.32, the std of the images in [-1, 1]),
  as SD scales its latents: the noise schedule assumes unit-variance data, and at 150 steps this alone
  took colour agreement from 3% to 100%. (Min-SNR weighting, gamma 5, tried before it: 28%.)
- A narrow UNet: widths (16, 32) take 0.16 CPU s a step of 64 images, (32, 64) 0.33 s. At equal CPU
  time the narrow one learned colour faster (300 vs 150 steps: 100% vs 31%) and about matched the wide
  one on shapes (1,500 vs 800 steps: 41% vs 47%, within the noise of 64 samples).
- Batch 32 for the quick profile: at a fixed 150 steps it halved the cost and kept 100% colour.
- 10% empty captions, so the unconditional branch that guidance 7.5 extrapolates from is trained; AdamW
  with warm-up and cosine decay; an EMA of the weights (0.995) for the full profile.
- Shape agreement stayed between 25% and 47% for every variant tried at full cost or twice it (wider,
  3,000 steps, three levels, cosine schedule) and does not depend on guidance (41% at 7.5 and at 1):
  shapes at 16 x 16 need far more training than minutes of CPU; colour, the acceptance bar, is at
  100% from a few hundred steps.

Measured with the final code on 2 cores that other processes shared (so seconds are upper bounds):
- quick (250 steps of 32): colour agreement 100%, 97%, 100%, 100% on seeds 0-3 (32 samples each),
  shapes 19-31%; 25 s of training on one thread.
- full (1,500 steps of 64): colour 100%, shapes 41-42% (64 samples); 248 s on one thread, 357 s on two.
- The identity VAE's reconstruction RMSE: 0.002 (of 255).
Two threads gain only about 1.2x over one on these small kernels, and when other processes
oversubscribe the cores OpenMP's barriers made them 3-5x slower than one thread; weights are
deterministic for a seed and a thread count.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from modelzoo.demo.meters import measure
from modelzoo.demo.shapes import BASIC_COLOURS, SHAPES, dataset
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.clip_tokenizer import clip_tokenizer_files
from modelzoo.registry.families.lm import without_progress_bars

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]
"""Called after every training step with (step, steps, loss)."""

RESOLUTION = 16
UNET_WIDTHS = (16, 32)
MERGES = 8000
MAX_TOKENS = 16
TEXT_WIDTH = 64
LATENT_SCALE = 3.0
"""About 1 / 0.32, the standard deviation of shapes-world pixels in [-1, 1]."""
TRAIN_TIMESTEPS = 1000
CFG_DROPOUT = 0.1
GROUP_OFFSET = 100.0
"""K, the constant channels of the identity VAE: large enough that the image moves GroupNorm's standard
deviation by under 2e-4 (relative), small enough for float32."""


@dataclass(frozen=True)
class TrainProfile:
    """How long to train and how much to measure; `PROFILES` holds the two the demo uses."""

    unet_steps: int
    batch_size: int
    learning_rate: float
    ema_decay: float
    """0 keeps the last weights."""
    samples_per_prompt: int
    images: int = 10000


PROFILES: dict[str, TrainProfile] = {
    "full": TrainProfile(unet_steps=1500, batch_size=64, learning_rate=5e-3, ema_decay=0.995, samples_per_prompt=4),
    "quick": TrainProfile(unet_steps=250, batch_size=32, learning_rate=5e-3, ema_decay=0.0, samples_per_prompt=2),
}


def prompts() -> list[str]:
    """The 16 prompts trained on and measured, "a red circle" ... "a yellow star"."""
    return [f"a {colour} {shape}" for colour in BASIC_COLOURS for shape in SHAPES]


def _tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in clip_tokenizer_files(MERGES, MAX_TOKENS).items():
            (Path(tmp) / name).write_bytes(data)
        return CLIPTokenizer.from_pretrained(tmp)


def _text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        )
    )


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=UNET_WIDTHS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=8,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1,
    )


def _identity_vae() -> AutoencoderKL:
    """An `AutoencoderKL` whose encoder and decoder pass the image through (see the module docstring).

    Hidden channels 0-2 carry x, 3-5 carry -x and 6-7 the constants +K, -K; the one-group GroupNorm then
    sees mean 0 and standard deviation sigma = sqrt(K^2 + mean |x|^2) / 2 ~= K / 2, and the output
    convolution reads sigma (SiLU(x / sigma) - SiLU(-x / sigma)) = x. The log-variance is the clamp's
    floor, -30, so a posterior sample is its mean.
    """
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=3, norm_num_groups=1, sample_size=RESOLUTION,
        mid_block_add_attention=False, scaling_factor=LATENT_SCALE,
    )
    sigma = GROUP_OFFSET / 2
    with torch.no_grad():
        for block in vae.modules():
            if isinstance(block, ResnetBlock2D):
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
        for coder in (vae.encoder, vae.decoder):
            coder.conv_in.weight.zero_()
            coder.conv_in.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, GROUP_OFFSET, -GROUP_OFFSET]))
            coder.conv_out.weight.zero_()
            coder.conv_out.bias.zero_()
            for c in range(3):
                coder.conv_in.weight[c, c, 1, 1] = 1
                coder.conv_in.weight[3 + c, c, 1, 1] = -1
                coder.conv_out.weight[c, c, 1, 1] = sigma
                coder.conv_out.weight[c, 3 + c, 1, 1] = -sigma
        vae.encoder.conv_out.bias[3:] = -30.0
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight))
            conv.bias.zero_()
    return vae


def _fit(
    module: torch.nn.Module,
    loss_of_batch: Callable[[], torch.Tensor],
    steps: int,
    learning_rate: float,
    ema_decay: float,
    progress: Progress | None,
) -> None:
    """The training loop: AdamW, 5% linear warm-up then cosine decay to 0, gradients clipped at norm 1.

    `loss_of_batch` draws a batch and returns its loss. The module ends with the EMA of its weights
    (decay warmed up as (1 + step) / (10 + step)) or, for decay 0, with its last weights: a short run's
    cosine decay already settles them.
    """
    params = [q for q in module.parameters() if q.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    ema = [q.detach().clone() for q in params]
    module.train()
    for step in range(steps):
        loss = loss_of_batch()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, q in zip(ema, params, strict=True):
                average.lerp_(q, 1 - decay)
        if progress is not None:
            progress(step, steps, loss.item())
    with torch.no_grad():
        for q, average in zip(params, ema, strict=True):
            q.copy_(average)
    module.eval()


def train_pipeline(
    profile: TrainProfile, seed: int = 0, progress: Progress | None = None
) -> tuple[StableDiffusionPipeline, dict[str, float]]:
    """Train the UNet and text encoder on `profile.images` shapes-world images; deterministic for a seed.

    Returns the pipeline (EMA weights, in eval mode) and its training metrics: seconds, steps and the
    VAE's reconstruction RMSE in 0..255 pixel units.
    """
    started = time.perf_counter()
    images, captions, _ = dataset(profile.images, seed, RESOLUTION, SHAPES, BASIC_COLOURS)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.manual_seed(seed)
    vae = _identity_vae()
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
        reconstruction = vae.decode(latents).sample
    rmse = float(((reconstruction - x) * 127.5).pow(2).mean().sqrt())
    latents = latents * LATENT_SCALE

    tokenizer = _tokenizer()
    texts = sorted(set(captions)) + [""]
    token_ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    caption_of = torch.tensor([texts.index(c) for c in captions])
    text_encoder = _text_encoder(len(tokenizer))
    unet = _unet()
    scheduler = _scheduler()
    alpha_bar = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)

    def loss_of_batch() -> torch.Tensor:
        """v-prediction loss (Salimans & Ho 2022): v = alpha eps - sigma x0 for x_t = alpha x0 + sigma eps."""
        n = profile.batch_size
        index = torch.randint(len(latents), (n,), generator=generator)
        x0 = latents[index]
        unconditional = torch.rand(n, generator=generator) < CFG_DROPOUT
        text = torch.where(unconditional, len(texts) - 1, caption_of[index])
        eps = torch.randn(x0.shape, generator=generator)
        t = torch.randint(TRAIN_TIMESTEPS, (n,), generator=generator)
        alpha = alpha_bar[t].sqrt().view(-1, 1, 1, 1)
        sigma = (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
        v = unet(alpha * x0 + sigma * eps, t, text_encoder(token_ids[text])[0]).sample
        return (v - (alpha * eps - sigma * x0)).pow(2).mean()

    trained = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    _fit(trained, loss_of_batch, profile.unet_steps, profile.learning_rate, profile.ema_decay, progress)
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    metrics = {
        "train_seconds": time.perf_counter() - started,
        "unet_steps": profile.unet_steps,
        "batch_size": profile.batch_size,
        "vae_reconstruction_rmse": rmse,
    }
    return pipe, metrics


def agreement(pipe: DiffusionPipeline, samples_per_prompt: int, seed: int = 0) -> dict[str, float]:
    """Share of default-settings samples whose measured colour / shape is the prompt's, over `prompts()`.

    Colours are read against the whole palette (orange and purple count as wrong).
    """
    pipe.set_progress_bar_config(disable=True)
    asked = prompts()
    with torch.no_grad():
        images = pipe(asked, num_images_per_prompt=samples_per_prompt, generator=torch.Generator().manual_seed(seed),
                      output_type="np").images
    readings = measure((images * 255).round().clip(0, 255).astype(np.uint8))
    wanted = [prompt.split()[1:] for prompt in asked for _ in range(samples_per_prompt)]
    pairs = list(zip(readings, wanted, strict=True))
    return {
        "colour_agreement": float(np.mean([r.colour == colour for r, (colour, _) in pairs])),
        "shape_agreement": float(np.mean([r.shape == shape for r, (_, shape) in pairs])),
        "samples": len(readings),
    }


def train_diffusion(
    out_dir: Path, seed: int = 0, profile: str = "full", progress: Progress | None = None
) -> dict[str, float]:
    """Train with the named profile, save the pipeline to `out_dir`, load it back and measure it.

    Returns the training metrics of `train_pipeline` plus `agreement` of the reloaded pipeline and the
    seconds the measuring took.
    """
    if profile not in PROFILES:
        raise BadInput(f"unknown training profile {profile!r}; choose one of {', '.join(PROFILES)}")
    chosen = PROFILES[profile]
    pipe, metrics = train_pipeline(chosen, seed, progress)
    log.info("trained %s in %.0f s; measuring", out_dir, metrics["train_seconds"])
    started = time.perf_counter()
    with without_progress_bars(diffusers_logging, transformers_logging):
        pipe.save_pretrained(out_dir)
        reloaded = DiffusionPipeline.from_pretrained(out_dir)
    metrics |= agreement(reloaded, chosen.samples_per_prompt, seed)
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics
