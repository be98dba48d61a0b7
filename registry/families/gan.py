"""The GAN family: a StyleGAN2 generator (`stylegan.py`) stored as a config plus one safetensors file.

A GAN version on disk, as `save_gan` writes it, `zoo import DIR` reads it and `zoo export` writes it back:

    config.json        {"family": "gan", "model_type": "stylegan2", **StyleGanConfig.to_dict()}
    model.safetensors  the generator's state dict under the official stylegan2-ada-pytorch names

Converting an official checkpoint. NVlabs' `.pkl` files pickle whole Python objects, and unpickling runs
whatever code the file names, so modelzoo never unpickles one. Open it yourself with code you trust (the
official repository's `legacy.load_network_pkl`), take the generator's state dict, and save that:

    G_ema = legacy.load_network_pkl(f)["G_ema"]                        # your code, your trust decision
    save_gan(convert_official_state_dict(G_ema.state_dict()), StyleGanConfig.stylegan2_256(), "cat256")
    # then: zoo import cat256 --name lsun-cat

Sampling: seed s is always the latent `latents_for_seeds([s])` (the official `generate.py --seeds` z),
so every version of a model starts seed s from the same z and parent and child compare image by image.
Each seed runs through the generator on its own, because batched matrix products are not bitwise equal
to unbatched ones and a sample must not depend on the batch it was drawn in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, Sample, stored_json_config
from modelzoo.registry.families.stylegan import (
    Generator,
    NoiseMode,
    StyleGanConfig,
    SynthesisLayer,
    ToRGBLayer,
    latents_for_seeds,
    official_to_local,
)
from modelzoo.registry.safetensors_io import iter_tensors, write_tensors
from modelzoo.registry.store import Registry

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "stylegan2"
# Noise modes that keep a sample a function of its seed; "random" would draw from torch's global RNG.
SEEDED_NOISE_MODES: tuple[NoiseMode, ...] = ("const", "none")


def gan_config_json(config: StyleGanConfig) -> dict[str, Any]:
    """The content of a GAN version's config.json."""
    return {"family": "gan", "model_type": MODEL_TYPE, **config.to_dict()}


def config_from_json(data: Mapping[str, Any]) -> StyleGanConfig:
    """Read a config.json written by `gan_config_json` (the family and model_type keys are checked, not kept)."""
    fields = dict(data)
    model_type = fields.pop("model_type", MODEL_TYPE)
    if fields.pop("family", "gan") != "gan" or model_type != MODEL_TYPE:
        raise BadInput(f"config.json describes a {data.get('family')}/{model_type} model, not a StyleGAN2 GAN")
    return StyleGanConfig.from_dict(fields)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official stylegan2-ada-pytorch generator state dict (`G_ema.state_dict()`) in modelzoo's names.

    The names are the same; the fixed `resample_filter` buffers are dropped and every tensor is moved to
    the CPU. Accepts an already converted dict unchanged, so it is safe to apply twice.
    """
    bad = sorted(key for key, value in state_dict.items() if not isinstance(value, Tensor))
    if bad:
        raise BadInput(f"a state dict maps names to tensors; {bad[:3]} are not tensors")
    return {key: value.detach().cpu() for key, value in official_to_local(state_dict).items()}


def check_state_dict(config: StyleGanConfig, state_dict: Mapping[str, Tensor]) -> None:
    """Refuse tensors that do not fit the generator `config` describes: missing, unexpected or misshapen."""
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in Generator(config).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or misshapen:
        problems = [
            f"{label} {names[:3]}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
            if names
        ]
        raise BadInput(
            f"the tensors do not fit {config}: {'; '.join(problems)} "
            "(check resolution, z_dim/w_dim, mapping_layers, channel_base and channel_max)"
        )


def generator_from_state_dict(
    config: StyleGanConfig, state_dict: Mapping[str, Tensor], device: str | torch.device = "cpu"
) -> Generator:
    """A generator in eval mode whose tensors ARE the given ones (no copy on the CPU), as float32.

    Built on the meta device first, so a full-size generator is never randomly initialised just to be
    overwritten. Half-precision checkpoints are upcast: the modulated convolutions run in float32.
    """
    tensors = convert_official_state_dict(state_dict)
    check_state_dict(config, tensors)
    with torch.device("meta"):
        G = Generator(config)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    G.load_state_dict(tensors, strict=True, assign=True)
    return G.to(device).eval().requires_grad_(False)


def save_gan(generator: Generator | Mapping[str, Tensor], config: StyleGanConfig, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` into `directory` (created if needed); returns it.

    `generator` is a Generator or a state dict (official names, e.g. from `convert_official_state_dict`);
    it must fit `config`, which is checked before anything is written.
    """
    if isinstance(generator, Generator):
        if generator.config != config:
            raise BadInput(f"the generator was built from {generator.config}, not {config}")
        generator = generator.state_dict()
    tensors = convert_official_state_dict(generator)
    check_state_dict(config, tensors)
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / WEIGHTS_FILE, "wb") as f:
        write_tensors(f, dict(sorted(tensors.items())), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(gan_config_json(config), indent=2) + "\n")
    return out


def load_gan(directory: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Read a folder written by `save_gan` or `zoo export` back into a generator, without a registry."""
    root = Path(directory)
    if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise BadInput(f"{root} is not a GAN folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = config_from_json(json.loads((root / CONFIG_FILE).read_text()))
    tensors = {info.name: tensor for info, tensor in iter_tensors(root / WEIGHTS_FILE)}
    return generator_from_state_dict(config, tensors, device)


def images_to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded as the official generate.py does."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        raise BadInput(f"cannot show {images.shape[1]}-channel images as RGB")
    pixels = (images.permute(0, 2, 3, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.cpu().numpy()


class GanFamily:
    """Adapter for StyleGAN2 generators: one module (registry tensor names = state-dict keys)."""

    name: ClassVar[str] = "gan"
    takes_prompts: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = False

    def load(self, registry: Registry, ref: str, device: str = "cpu") -> LoadedModel:
        info, config_json = stored_json_config(registry, ref, self.name, CONFIG_FILE, "save_gan")
        config = config_from_json(config_json)
        G = generator_from_state_dict(config, registry.load_tensors(info.ref), device)
        return LoadedModel(ref=info.ref, family=self.name, pipeline=G, modules={"": G}, config=config_json)

    def sample(
        self,
        model: LoadedModel,
        seeds: Sequence[int],
        prompt: str | None = None,
        *,
        truncation_psi: float = 1.0,
        noise_mode: NoiseMode = "const",
        **options: Any,
    ) -> list[Sample]:
        """One image per seed from z = latents_for_seeds([seed]), truncated towards w_avg by `truncation_psi`."""
        if prompt is not None:
            raise BadInput(f"{model.ref} is a GAN: it samples from seeds alone and takes no prompt")
        if options:
            raise BadInput(f"a GAN sampler has no option {sorted(options)}; it takes truncation_psi and noise_mode")
        if noise_mode not in SEEDED_NOISE_MODES:
            raise BadInput(f"noise_mode must be one of {SEEDED_NOISE_MODES} so that a seed fixes the image")
        G: Generator = model.pipeline
        device = G.mapping.w_avg.device
        latents = latents_for_seeds(seeds, G.z_dim).to(device)
        samples = []
        with torch.no_grad():
            for seed, z in zip(seeds, latents, strict=True):
                image = G(z[None], truncation_psi=truncation_psi, noise_mode=noise_mode)
                samples.append(Sample(seed=seed, prompt=None, image=images_to_uint8(image)[0]))
        return samples

    def editable_tensors(self, model: LoadedModel) -> list[str]:
        """The base weights of the synthesis convolutions and toRGB layers, in forward order."""
        G: Generator = model.pipeline
        return [
            f"{name}.weight"
            for name, module in G.named_modules()
            if name.startswith("synthesis.") and isinstance(module, SynthesisLayer | ToRGBLayer)
        ]
