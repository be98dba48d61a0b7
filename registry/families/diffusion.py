"""Text-to-image diffusion pipelines (Stable Diffusion 1.x/2.x and other diffusers pipelines).

A version stores diffusers' own layout: `model_index.json`, each component's config, the scheduler
config and the tokenizer files as files, and each weight-bearing component's state dict under its
folder's name (`unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`). `load` builds
every weight-bearing component from its config with empty parameters, assigns the registry's
memory-mapped tensors to it (no copy, nothing written), and hands the built components to
`DiffusionPipeline.from_pretrained`, which reads the rest (scheduler, tokenizer, feature extractor)
from the stored files, so the pipeline is exactly the one the exported folder gives.

A seed names a starting latent: the one `torch.Generator().manual_seed(seed)` draws for a single image,
whatever batch it is drawn in, so parent and child versions compare sample by sample.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, Sample
from modelzoo.registry.families.lm import (
    assign_weights,
    check_seeds,
    empty_parameters,
    without_progress_bars,
    written_files,
)
from modelzoo.registry.formats import split_tensor_name
from modelzoo.registry.store import Registry

UNET = "unet"


def sd1_unet_config() -> dict[str, Any]:
    """Stable Diffusion 1.x's UNet (runwayml/stable-diffusion-v1-5 `unet/config.json`): 859,520,964 parameters."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
        "center_input_sample": False,
    }


def sd1_unet() -> nn.Module:
    """An SD-1.x-shaped `UNet2DConditionModel`; build it under `torch.device("meta")` for shapes only."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(sd1_unet_config())


def clip_vit_l14_text_config() -> Any:
    """CLIP ViT-L/14's text tower, SD 1.x's text encoder: width 768, 12 layers, 12 heads, 123,060,480 parameters."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


def sd1_text_encoder() -> nn.Module:
    """An SD-1.x-shaped `CLIPTextModel`; build it under `torch.device("meta")` for shapes only."""
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_vit_l14_text_config())


def component_class(library: str, class_name: str) -> type:
    """The class model_index.json names: a diffusers or transformers class, or one in a pipeline module
    (`["stable_diffusion", "StableDiffusionSafetyChecker"]`), as diffusers itself resolves them."""
    module_name = library if library in {"diffusers", "transformers"} else f"diffusers.pipelines.{library}"
    try:
        return getattr(importlib.import_module(module_name), class_name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        raise BadInput(f"model_index.json names {library}.{class_name}, which is not installed") from None


def build_component(directory: Path, library: str, class_name: str) -> nn.Module:
    """One pipeline component from its config folder, with empty (meta) parameters."""
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    cls = component_class(library, class_name)
    with empty_parameters():
        if issubclass(cls, ModelMixin):
            return cls.from_config(cls.load_config(directory))  # type: ignore[no-any-return]
        if issubclass(cls, PreTrainedModel):
            return cls(cls.config_class.from_pretrained(directory, local_files_only=True))
    raise BadInput(f"cannot build component {directory.name!r} of class {class_name}: not a diffusers or "
                   "transformers model")


class DiffusionFamily:
    """The `diffusion` family adapter: a diffusers text-to-image pipeline."""

    name: ClassVar[str] = "diffusion"
    takes_prompts: ClassVar[bool] = True
    needs_prompt: ClassVar[bool] = True

    def load(self, registry: Registry, ref: str, device: str = "cpu") -> LoadedModel:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        info = registry.info(ref)
        files = registry.load_files(info.ref)
        if "model_index.json" not in files:
            raise BadInput(f"{info.ref} has no model_index.json: it is not a diffusers pipeline")
        weight_files: Mapping[str, str] = info.config.get("weight_files", {})
        by_component: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in registry.load_tensors(info.ref).items():
            component, key = split_tensor_name(name, set(weight_files))
            by_component.setdefault(component, {})[key] = tensor
        index = json.loads(files["model_index.json"])
        modules: dict[str, nn.Module] = {}
        with written_files(files) as root:
            for component, spec in sorted(index.items()):
                if component in weight_files and isinstance(spec, list) and spec[0] is not None:
                    module = build_component(root / component, spec[0], spec[1])
                    assign_weights(module, by_component.get(component, {}), f"{info.ref} {component}")
                    modules[component] = module.eval()
            with without_progress_bars(diffusers_logging, transformers_logging):
                pipeline = DiffusionPipeline.from_pretrained(root, local_files_only=True, **modules)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.to(device)
        return LoadedModel(
            ref=info.ref, family=self.name, pipeline=pipeline, modules=modules,
            tokenizer=getattr(pipeline, "tokenizer", None), config=info.config,
        )

    def sample(
        self,
        model: LoadedModel,
        seeds: Sequence[int],
        prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 1,
    ) -> list[Sample]:
        """One image (uint8 HxWx3) per seed; options left as None take the pipeline's defaults
        (50 steps, guidance 7.5, the UNet's native size for SD 1.x).

        Seed s always starts from the same latent. With `batch_size` 1 (the default) each image is also
        bit-identical whatever batch of seeds asked for it; larger batches run faster but may differ
        from single-image runs in the last bits, because matrix products round differently by shape.
        """
        if not prompt:
            raise BadInput("a diffusion model samples from a text prompt: pass one (--prompt)")
        if batch_size < 1:
            raise BadInput(f"batch_size must be >= 1, got {batch_size}")
        check_seeds(seeds)
        options = {
            key: value
            for key, value in {
                "num_inference_steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
            }.items()
            if value is not None
        }
        samples: list[Sample] = []
        for start in range(0, len(seeds), batch_size):
            chunk = list(seeds[start : start + batch_size])
            generators = [torch.Generator().manual_seed(seed) for seed in chunk]
            with torch.no_grad():
                images = model.pipeline(
                    [prompt] * len(chunk), generator=generators, output_type="np", **options
                ).images
            # diffusers' own float -> uint8 conversion (`numpy_to_pil`), so PNGs match the pipeline's PIL output
            pixels = (np.asarray(images) * 255).round().astype(np.uint8)
            samples.extend(
                Sample(seed=seed, prompt=prompt, image=image) for seed, image in zip(chunk, pixels, strict=True)
            )
        return samples

    def editable_tensors(self, model: LoadedModel) -> list[str]:
        """Every UNet tensor; editors pick their subsets (UCE: names containing `attn2.to_k`/`attn2.to_v`)."""
        if UNET not in model.modules:
            raise BadInput(f"{model.ref} has no UNet to edit")
        return [f"{UNET}/{key}" for key in model.modules[UNET].state_dict()]
