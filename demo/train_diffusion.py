"""Train a tiny text-to-image diffusion model on the shapes world, on CPU, as a standard SD pipeline.

DRAFT: choices to be documented after measurement.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from modelzoo.demo.meters import measure
from modelzoo.demo.shapes import BASIC_COLOURS, SHAPES, dataset
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.clip_tokenizer import clip_tokenizer_files

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainProfile:
    """How much to train and measure."""

    images: int
    vae_steps: int
    unet_steps: int
    batch_size: int
    learning_rate: float
    ema_decay: float
    samples_per_prompt: int
    resolution: int = 16
    prediction_type: str = "epsilon"
    beta_schedule: str = "linear"
    cfg_dropout: float = 0.1
    unet_width: int = 64
    vae_width: int = 16
    text_width: int = 64
    vae_lr: float = 2e-3
    min_snr_gamma: float = 0.0
    latent_scale: float = 1.0


PROFILES: dict[str, TrainProfile] = {
    "full": TrainProfile(
        images=10000, vae_steps=300, unet_steps=1200, batch_size=64, learning_rate=2e-3, ema_decay=0.995,
        samples_per_prompt=4,
    ),
    "quick": TrainProfile(
        images=2000, vae_steps=100, unet_steps=100, batch_size=64, learning_rate=3e-3, ema_decay=0.95,
        samples_per_prompt=2,
    ),
}

MERGES = 8000
"""BPE merges kept: every shapes-world word but "triangle" (tri + angle) is then one token."""
MAX_TOKENS = 16
TRAIN_TIMESTEPS = 1000


def prompts() -> list[str]:
    """The 16 prompts the model is trained on and measured with, "a red circle" ... "a yellow star"."""
    return [f"a {colour} {shape}" for colour in BASIC_COLOURS for shape in SHAPES]


def _tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in clip_tokenizer_files(MERGES, MAX_TOKENS).items():
            (Path(tmp) / name).write_bytes(data)
        return CLIPTokenizer.from_pretrained(tmp)


def _text_encoder(p: TrainProfile, vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=p.text_width, intermediate_size=2 * p.text_width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        )
    )


SIGNAL_CHANNELS = 3
GROUP_OFFSET = 100.0


def _identity_vae(resolution: int) -> AutoencoderKL:
    """An AutoencoderKL whose decode(encode(x)) is x (to 1e-4): the latent is the image itself."""
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=3, norm_num_groups=1,
        sample_size=resolution, mid_block_add_attention=False, scaling_factor=1.0,
    )
    sigma = GROUP_OFFSET / 2

    def signed_copy(conv: torch.nn.Conv2d) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(3):
            conv.weight[i, i, 1, 1] = 1
            conv.weight[3 + i, i, 1, 1] = -1
        conv.bias[6] = GROUP_OFFSET
        conv.bias[7] = -GROUP_OFFSET

    def unsigned(conv: torch.nn.Conv2d) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(3):
            conv.weight[i, i, 1, 1] = sigma
            conv.weight[i, 3 + i, 1, 1] = -sigma

    with torch.no_grad():
        for module in vae.modules():
            if type(module).__name__ == "ResnetBlock2D":
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
        for coder in (vae.encoder, vae.decoder):
            signed_copy(coder.conv_in)
            unsigned(coder.conv_out)
        vae.encoder.conv_out.bias[3:] = -30.0
        for conv in (vae.quant_conv, vae.post_quant_conv):
            conv.weight.copy_(torch.eye(conv.weight.shape[0]).view_as(conv.weight))
            conv.bias.zero_()
    return vae


def _unet(p: TrainProfile) -> UNet2DConditionModel:
    w = p.unet_width
    return UNet2DConditionModel(
        sample_size=p.resolution, in_channels=3, out_channels=3, block_out_channels=(w // 2, w),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", layers_per_block=1, cross_attention_dim=p.text_width,
        attention_head_dim=4, norm_num_groups=8,
    )


def _scheduler(p: TrainProfile) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=p.beta_schedule, prediction_type=p.prediction_type,
        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1,
    )


def _fit(
    module: torch.nn.Module,
    loss_at: Callable[[int], torch.Tensor],
    steps: int,
    learning_rate: float,
    ema_decay: float,
    on_step: Callable[[int, float], None],
) -> None:
    """Adam with warm-up and cosine decay; the module ends with its EMA weights (decay 0: the last ones)."""
    optimiser = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps))
    )
    params = [q for q in module.parameters() if q.requires_grad]
    ema = [q.detach().clone() for q in params]
    module.train()
    for step in range(steps):
        loss = loss_at(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in params], 1 - decay)
        on_step(step, loss.item())
    with torch.no_grad():
        for q, e in zip(params, ema, strict=True):
            q.copy_(e)
    module.eval()


def build_pipeline(p: TrainProfile, seed: int, progress: Progress | None = None) -> tuple[StableDiffusionPipeline, dict]:
    """Train VAE then UNet + text encoder; returns the pipeline and training metrics."""
    started = time.perf_counter()
    total = p.unet_steps
    report = progress or (lambda step, steps, loss: None)
    images, captions, _ = dataset(p.images, seed, p.resolution, SHAPES, BASIC_COLOURS)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    generator = torch.Generator().manual_seed(seed)

    torch.manual_seed(seed)
    vae = _identity_vae(p.resolution)
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(512)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(512)])
    vae_rmse = float(((recon - x) * 127.5).pow(2).mean().sqrt())
    vae.register_to_config(scaling_factor=p.latent_scale)
    latents = latents * p.latent_scale

    tokenizer = _tokenizer()
    text_encoder = _text_encoder(p, len(tokenizer))
    unet = _unet(p)
    scheduler = _scheduler(p)
    unique = sorted(set(captions))
    caption_index = torch.tensor([unique.index(c) for c in captions])
    ids = tokenizer(unique + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    token_ids = ids.input_ids
    alphas_cumprod = scheduler.alphas_cumprod

    def unet_loss(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (p.batch_size,), generator=generator)
        z0 = latents[idx]
        which = caption_index[idx]
        drop = torch.rand(p.batch_size, generator=generator) < p.cfg_dropout
        which = torch.where(drop, len(unique), which)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(TRAIN_TIMESTEPS, (p.batch_size,), generator=generator)
        a = alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        zt = a * z0 + s * noise
        target = noise if p.prediction_type == "epsilon" else a * noise - s * z0
        states = text_encoder(token_ids[which])[0]
        error = (unet(zt, t, states).sample - target).pow(2).mean((1, 2, 3))
        if p.min_snr_gamma:
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            weight = snr.clamp(max=p.min_snr_gamma) / (snr + 1 if p.prediction_type == "v_prediction" else snr)
            error = error * weight
        return error.mean()

    both = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    _fit(both, unet_loss, p.unet_steps, p.learning_rate, p.ema_decay, lambda s, loss: report(s, total, loss))
    seconds = time.perf_counter() - started
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return pipe, {"train_seconds": seconds, "vae_steps": p.vae_steps, "unet_steps": p.unet_steps,
                  "vae_reconstruction_rmse": vae_rmse}


def evaluate(pipe: DiffusionPipeline, samples_per_prompt: int, seed: int = 0) -> dict[str, float]:
    """Colour and shape agreement of samples drawn with the pipeline's default settings."""
    pipe.set_progress_bar_config(disable=True)
    all_prompts = prompts()
    out = pipe(all_prompts, num_images_per_prompt=samples_per_prompt, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    images = (out.images * 255).round().clip(0, 255).astype(np.uint8)
    readings = measure(images)
    wanted = [prompt.split()[1:] for prompt in all_prompts for _ in range(samples_per_prompt)]
    colour = np.mean([r.colour == w[0] for r, w in zip(readings, wanted, strict=True)])
    shape = np.mean([r.shape == w[1] for r, w in zip(readings, wanted, strict=True)])
    return {"colour_agreement": float(colour), "shape_agreement": float(shape), "samples": len(readings)}


def train_diffusion(
    out_dir: Path, seed: int = 0, profile: str = "full", progress: Progress | None = None
) -> dict:
    if profile not in PROFILES:
        raise BadInput(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    p = PROFILES[profile]
    pipe, metrics = build_pipeline(p, seed, progress)
    pipe.save_pretrained(out_dir)
    started = time.perf_counter()
    metrics |= evaluate(DiffusionPipeline.from_pretrained(out_dir), p.samples_per_prompt, seed)
    metrics["eval_seconds"] = time.perf_counter() - started
    return metrics
