"""Single-file Stable Diffusion checkpoints (the original LDM layout that A1111 and ComfyUI hold):
`zoo import model.safetensors --family diffusion` and `zoo export REF FILE --format single-file`.

Import is diffusers' own `from_single_file`, given the architecture's config offline: `--config DIR` (a
diffusers pipeline folder; its weights are not read) or a registered diffusion version whose tensors
have exactly the shapes the checkpoint converts to. diffusers ships no configs of its own, and nothing is
fetched, so a checkpoint that fits neither is refused with that advice. The converted pipeline is saved
as a diffusers folder and imported as any other, the single file recorded as its source.

Export writes the inverse of diffusers' conversion for SD 1.x layouts (`model.diffusion_model.`,
`first_stage_model.`, `cond_stage_model.transformer.`), parameterised by the UNet's and VAE's configs
as diffusers' converter is, so every layout diffusers reads back converts back to the same tensors.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from modelzoo.registry.errors import BadInput
from modelzoo.registry.files import read_limited
from modelzoo.registry.formats import ImportSource, read_source, split_tensor_name
from modelzoo.registry.safetensors_io import read_header
from modelzoo.registry.store import Registry

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
UNET_LAYERS = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
VAE_LAYERS = {"conv_norm_out": "norm_out"}
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
MAX_CONFIG_BYTES = 2**20
REF_FILE = ".zoo-ref"  # in a config folder written from a registered version: which one


def is_single_file_checkpoint(path: Path) -> bool:
    """A safetensors file in the original LDM layout (its UNet under `model.diffusion_model.`)."""
    return path.suffix == ".safetensors" and path.is_file() and any(
        k.startswith(UNET_PREFIX) for k in read_header(path).tensors)


@contextmanager
def converted(registry: Registry, path: Path, config_dir: Path | None) -> Iterator[ImportSource]:
    """The checkpoint converted by diffusers into a diffusers folder, for the block to import, with the
    architecture's config from `config_dir` or a registered version of the same shapes."""
    with tempfile.TemporaryDirectory(prefix="zoo-single-file-") as tmp:
        yield _convert(registry, path, None if config_dir is None else _config_dir(config_dir), Path(tmp))


def _convert(registry: Registry, path: Path, config_dir: Path | None, out: Path) -> ImportSource:
    from diffusers import StableDiffusionPipeline

    read_header(path)  # a malformed file is refused before diffusers opens it
    candidates = [config_dir] if config_dir is not None else None
    with _configs(registry, candidates) as configs:
        for config in configs:
            try:
                pipe = StableDiffusionPipeline.from_single_file(
                    str(path), config=str(config), local_files_only=True, safety_checker=None,
                    requires_safety_checker=False)
            except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
                if config_dir is not None:
                    raise BadInput(f"{path} does not convert with the config in {config_dir}: "
                                   f"{str(e).strip().splitlines()[0][:300]}") from None
                continue
            if config_dir is not None or _same_shapes(registry, pipe, config):
                pipe.save_pretrained(out)
                source = read_source(out, family="diffusion")
                source.path, source.originals = path.resolve(), {path.name: path}
                source.extra_source = {"single_file": path.name,
                                       "config": str(config_dir) if config_dir else (config / REF_FILE).read_text()}
                return source
    raise BadInput(f"no architecture config for {path} can be found offline: pass --config DIR (a diffusers "
                   "pipeline folder of the same architecture), or import a diffusers version of the same shapes first")


@contextmanager
def _configs(registry: Registry, given: list[Path] | None) -> Iterator[list[Path]]:
    """The config folders to try: the one given, or each registered diffusion version's files."""
    if given is not None:
        yield given
        return
    from modelzoo.registry.families.lm import written_files
    from modelzoo.registry.queries import ListFilter, list_models

    with tempfile.TemporaryDirectory(prefix="zoo-configs-") as tmp:
        folders = []
        for model in list_models(registry, ListFilter(family="diffusion")):
            if model.latest is None:
                continue
            ref = f"{model.name}@{model.latest}"
            files = registry.load_files(ref)
            if "model_index.json" not in files:
                continue
            with written_files(files) as root:
                folder = Path(tmp) / model.name
                folder.mkdir()
                for item in root.rglob("*"):
                    if item.is_file():
                        target = folder / item.relative_to(root)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(item.read_bytes())
            (folder / REF_FILE).write_text(ref)
            folders.append(folder)
        yield folders


def _same_shapes(registry: Registry, pipe: Any, config: Path) -> bool:
    """Whether the converted pipeline has exactly the tensor names and shapes of the registered version
    whose config it was converted with."""
    stored = {n: tuple(b.shape or ()) for (k, n), b in registry.manifest((config / REF_FILE).read_text()).items()
              if k == "tensor"}
    converted = {f"{c}/{k}": tuple(v.shape) for c in ("unet", "vae", "text_encoder")
                 for k, v in getattr(pipe, c).state_dict().items()}
    return all(stored.get(name) == shape for name, shape in converted.items())


def single_file_tensors(registry: Registry, ref: str) -> dict[str, torch.Tensor]:
    """A diffusion version's UNet, VAE and CLIP text encoder in the original LDM layout."""
    info = registry.info(ref)
    if info.family != "diffusion":
        raise BadInput(f"{info.ref} is a {info.family} model; single-file checkpoints hold diffusion pipelines")
    files = registry.load_files(info.ref)
    weight_files = info.config.get("weight_files", {})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in registry.load_tensors(info.ref).items():
        component, key = split_tensor_name(name, set(weight_files))
        parts.setdefault(component, {})[key] = tensor
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in parts]
    if missing or "text_encoder_2" in parts:
        raise BadInput(f"{info.ref} is not an SD 1.x-style pipeline (UNet, VAE and one CLIP text encoder); "
                       "single-file export writes that layout only")
    text_config = _json(files, "text_encoder/config.json", info.ref)
    if "CLIPTextModel" not in text_config.get("architectures", []):
        raise BadInput(f"{info.ref}'s text encoder is not a CLIPTextModel; single-file export writes SD 1.x layouts")
    unet = _unet_to_ldm(parts["unet"], _json(files, "unet/config.json", info.ref))
    vae = _vae_to_ldm(parts["vae"], _json(files, "vae/config.json", info.ref))
    tensors = {UNET_PREFIX + k: v for k, v in unet.items()}
    tensors |= {VAE_PREFIX + k: v for k, v in vae.items()}
    # the original names keep CLIPTextModel's `text_model.` level, which newer transformers save without
    tensors |= {CLIP_PREFIX + (k if k.startswith("text_model.") else f"text_model.{k}"): v
                for k, v in parts["text_encoder"].items()}
    return tensors


def _json(files: Mapping[str, bytes], name: str, ref: str) -> dict[str, Any]:
    if name not in files:
        raise BadInput(f"{ref} has no {name}")
    value = json.loads(files[name])
    if not isinstance(value, dict):
        raise BadInput(f"{ref}: {name} is not a JSON object")
    return value


def _renamed(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for new, old in pairs:
        if key.startswith(new + "."):
            return old + key[len(new):]
    return key


def _unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' `convert_ldm_unet_checkpoint` for this config."""
    per = int(config["layers_per_block"]) + 1
    up_types = list(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        layer, _, rest = key.rpartition(".")
        if layer in UNET_LAYERS:
            ldm = f"{UNET_LAYERS[layer]}.{rest}"
        elif parts[0] == "down_blocks" and parts[2] == "resnets":
            b, j, tail = int(parts[1]), int(parts[3]), ".".join(parts[4:])
            ldm = f"input_blocks.{b * per + j + 1}.0.{_renamed(tail, RESNET)}"
        elif parts[0] == "down_blocks" and parts[2] == "attentions":
            ldm = f"input_blocks.{int(parts[1]) * per + int(parts[3]) + 1}.1.{'.'.join(parts[4:])}"
        elif parts[0] == "down_blocks" and parts[2] == "downsamplers":
            ldm = f"input_blocks.{(int(parts[1]) + 1) * per}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            ldm = f"middle_block.{2 * int(parts[2])}.{_renamed('.'.join(parts[3:]), RESNET)}"
        elif parts[0] == "mid_block" and parts[1] == "attentions":
            ldm = f"middle_block.1.{'.'.join(parts[3:])}"
        elif parts[0] == "up_blocks" and parts[2] == "resnets":
            b, j, tail = int(parts[1]), int(parts[3]), ".".join(parts[4:])
            ldm = f"output_blocks.{b * per + j}.0.{_renamed(tail, RESNET)}"
        elif parts[0] == "up_blocks" and parts[2] == "attentions":
            ldm = f"output_blocks.{int(parts[1]) * per + int(parts[3])}.1.{'.'.join(parts[4:])}"
        elif parts[0] == "up_blocks" and parts[2] == "upsamplers":
            b = int(parts[1])
            slot = 2 if "CrossAttn" in up_types[b] else 1
            ldm = f"output_blocks.{b * per + per - 1}.{slot}.conv.{parts[-1]}"
        else:
            raise BadInput(f"UNet tensor {key} has no place in the single-file layout")
        out[ldm] = value
    return out


def _vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' `convert_ldm_vae_checkpoint` (attention projections back to 1x1 convs)."""
    ups = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        side, inner = parts[0], parts[1:]
        layer, _, rest = key.rpartition(".")
        if side not in ("encoder", "decoder"):
            ldm = key  # quant_conv, post_quant_conv
        elif inner[0] in VAE_LAYERS:
            ldm = f"{side}.{VAE_LAYERS[inner[0]]}.{rest}"
        elif inner[0] == "down_blocks" and inner[2] == "resnets":
            ldm = f"{side}.down.{inner[1]}.block.{inner[3]}.{_vae_resnet('.'.join(inner[4:]))}"
        elif inner[0] == "down_blocks" and inner[2] == "downsamplers":
            ldm = f"{side}.down.{inner[1]}.downsample.conv.{inner[-1]}"
        elif inner[0] == "up_blocks" and inner[2] == "resnets":
            ldm = f"{side}.up.{ups - 1 - int(inner[1])}.block.{inner[3]}.{_vae_resnet('.'.join(inner[4:]))}"
        elif inner[0] == "up_blocks" and inner[2] == "upsamplers":
            ldm = f"{side}.up.{ups - 1 - int(inner[1])}.upsample.conv.{inner[-1]}"
        elif inner[0] == "mid_block" and inner[1] == "resnets":
            ldm = f"{side}.mid.block_{int(inner[2]) + 1}.{_vae_resnet('.'.join(inner[3:]))}"
        elif inner[0] == "mid_block" and inner[1] == "attentions":
            ldm = f"{side}.mid.attn_1.{_renamed('.'.join(inner[3:]), VAE_ATTENTION)}"
            if value.ndim == 2:  # a linear in diffusers, a 1x1 conv in the original
                value = value[:, :, None, None]
        elif side in ("encoder", "decoder") and len(inner) == 2:
            ldm = key  # conv_in, conv_out
        else:
            raise BadInput(f"VAE tensor {key} has no place in the single-file layout")
        out[ldm] = value
    return out


def _vae_resnet(tail: str) -> str:
    return tail.replace("conv_shortcut", "nin_shortcut")


def _config_dir(path: Path) -> Path:
    """A `--config` for a single file must be a diffusers pipeline folder."""
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise BadInput(f"--config {path} must be a diffusers pipeline folder (with model_index.json) for a "
                       "single-file checkpoint")
    read_limited(path / "model_index.json", MAX_CONFIG_BYTES, "model_index.json")
    return path
