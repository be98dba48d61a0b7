"""Tiny real models built from configs with fixed seeds (the way diffusers and transformers test)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_gpt2(seed: int = 0, n_layer: int = 2, n_embd: int = 32, vocab_size: int = 128):  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=vocab_size, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def save_tiny_gpt2(directory: Path, seed: int = 0, **kwargs: int) -> Path:
    tiny_gpt2(seed, **kwargs).save_pretrained(directory)
    return directory


def tiny_sd_pipeline(seed: int = 0):  # type: ignore[no-untyped-def]
    """A StableDiffusionPipeline with diffusers' own tiny test shapes and an offline CLIP tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from modelzoo.registry.families.clip_tokenizer import clip_tokenizer_files

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=2, attention_head_dim=2,
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2, sample_size=16,
    )
    merges = 1000
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=16, intermediate_size=32, layer_norm_eps=1e-5,
        num_attention_heads=2, num_hidden_layers=2, pad_token_id=1, vocab_size=512 + merges + 2,
        max_position_embeddings=77,
    ))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in clip_tokenizer_files(merges).items():
            (Path(tmp) / name).write_bytes(data)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_sd(directory: Path, seed: int = 0) -> Path:
    tiny_sd_pipeline(seed).save_pretrained(directory)
    return directory


def sd_images(pipe, prompt: str = "a red circle", seed: int = 0) -> torch.Tensor:  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=2, generator=generator, output_type="pt", height=16, width=16)
    return out.images
