"""LoRA adapters as the tools that make them write them: PEFT's `save_pretrained`, diffusers'
`save_lora_weights`, and the kohya / A1111 key layout (random B, so every adapter changes its base)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tiny_models import tiny_gpt2, tiny_sd_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def save_peft_gpt2_lora(directory: Path, seed: int = 1, **config: Any) -> Path:
    """A PEFT LoRA folder for the tiny GPT-2 of `tiny_gpt2(0)`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True,
               "init_lora_weights": False, **config}
    get_peft_model(tiny_gpt2(), LoraConfig(**options)).save_pretrained(directory)
    return directory


def save_diffusers_sd_lora(directory: Path, seed: int = 1, rank: int = 2, alpha: int = 4) -> Path:
    """A diffusers LoRA file (`pytorch_lora_weights.safetensors`, with its adapter metadata) on the tiny
    pipeline's UNet and text encoder."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sd_pipeline()
    torch.manual_seed(seed)
    unet = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False)
    text = LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_TARGETS, init_lora_weights=False)
    inject_adapter_in_model(unet, pipe.unet)
    inject_adapter_in_model(text, pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet.to_dict(), text_encoder_lora_adapter_metadata=text.to_dict(),
    )
    return directory / "pytorch_lora_weights.safetensors"


def kohya_sd_lora(seed: int = 2, rank: int = 2, alphas: tuple[float, ...] = (3.0,)) -> dict[str, torch.Tensor]:
    """kohya / A1111 keys (`lora_unet_*`, `lora_te_*`, each pair with its `.alpha`) for the tiny pipeline's
    attention projections, the modules' alphas taken in turn from `alphas`."""
    pipe = tiny_sd_pipeline()
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module, targets in (("lora_unet_", pipe.unet, UNET_TARGETS),
                                    ("lora_te_", pipe.text_encoder, TEXT_TARGETS)):
        for i, (path, layer) in enumerate(module.named_modules()):
            if not any(path.endswith("." + t) for t in targets):
                continue
            # the original names keep CLIPTextModel's `text_model.` level, which newer transformers flatten
            named = f"text_model.{path}" if prefix == "lora_te_" and not path.startswith("text_model.") else path
            name = prefix + named.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(alphas[i % len(alphas)])
    return tensors


def save_kohya_sd_lora(path: Path, **options: Any) -> Path:
    save_file(kohya_sd_lora(**options), path)
    return path


def save_peft_sd_unet_lora(directory: Path, seed: int = 3) -> Path:
    """A diffusion adapter as PEFT folders, one per component (here `unet/`), as `PeftModel.save_pretrained`
    writes them."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=6, target_modules=UNET_TARGETS, init_lora_weights=False)
    get_peft_model(tiny_sd_pipeline().unet, config).save_pretrained(directory / "unet")
    return directory
