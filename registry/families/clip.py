"""CLIP image-text encoders built with open_clip's own model classes: the embedders search uses.

A CLIP version on disk, as `save_clip` writes it and `zoo import DIR` reads it:

    config.json        {"family": "clip", "model_type": "open_clip", "model_cfg": {...}, "image_size": 32,
                        "image_mean": [...], "image_std": [...]}
    model.safetensors  the `open_clip.model.CLIP` state dict (`visual.conv1.weight`, `logit_scale`, ...)

`model_cfg` is an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, optionally `quick_gelu`),
the same dictionary open_clip keeps in its `model_configs/*.json`, so `open_clip.model.CLIP(**model_cfg)`
rebuilds the architecture. Text is tokenised with open_clip's `SimpleTokenizer` (CLIP's BPE, which open_clip
ships, so nothing is downloaded) at the text tower's `context_length`.

A loaded version's `pipeline` is a `ClipEncoder`: batched `encode_images` / `encode_texts` returning
L2-normalised float32 features, the temperature `logit_scale` (CLIP's tau, 100 for OpenAI's models), and an
`id` and `weights_hash` that say which encoder a stored embedding came from. An encoder cannot be sampled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import Tensor

from modelzoo.registry.blobs import tensor_digest
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, Sample, stored_json_config
from modelzoo.registry.families.lm import assign_weights, empty_parameters
from modelzoo.registry.safetensors_io import dtype_name, iter_tensors, tensor_bytes, write_tensors
from modelzoo.registry.store import Registry

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "open_clip"
MAX_LOGIT_SCALE = 100.0
"""CLIP clamps its temperature at 100 (Radford et al. 2021, sec. 2.5); open_clip's training does the same."""


@dataclass(frozen=True)
class ClipConfig:
    """What rebuilds a CLIP version: the open_clip model config and the image preprocessing.

    Images are resized to `image_size` (when they are not that size already), scaled to [0, 1], then
    normalised per channel by `image_mean` and `image_std`.
    """

    model_cfg: Mapping[str, Any]
    image_size: int
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    def to_json(self) -> dict[str, Any]:
        """The content of a CLIP version's config.json."""
        return {
            "family": "clip",
            "model_type": MODEL_TYPE,
            "model_cfg": json.loads(json.dumps(self.model_cfg)),
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClipConfig:
        if data.get("family", "clip") != "clip" or data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise BadInput(
                f"config.json describes a {data.get('family')}/{data.get('model_type')} model, not an open_clip CLIP"
            )
        model_cfg = data.get("model_cfg")
        if not isinstance(model_cfg, Mapping) or "embed_dim" not in model_cfg:
            raise BadInput("a CLIP config.json needs `model_cfg`, an open_clip model config with `embed_dim`")
        mean = tuple(float(v) for v in data.get("image_mean", cls.image_mean))
        std = tuple(float(v) for v in data.get("image_std", cls.image_std))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise BadInput(f"image_mean and image_std need 3 values each (std > 0), got {mean} and {std}")
        size = data.get("image_size", model_cfg.get("vision_cfg", {}).get("image_size"))
        if not isinstance(size, int) or size < 1:
            raise BadInput(f"image_size must be a positive integer, got {size!r}")
        return cls(dict(model_cfg), size, mean, std)


def build_clip(model_cfg: Mapping[str, Any]) -> CLIP:
    """`open_clip.model.CLIP(**model_cfg)`, refusing configs that open_clip would fetch weights for."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name") or text.get("hf_model_name"):
        raise BadInput("timm or Hugging Face towers are not supported; give open_clip's own ViT/ResNet and text tower")
    try:
        return CLIP(**model_cfg)
    except TypeError as e:
        raise BadInput(f"model_cfg is not an open_clip CLIP config: {e}") from None


def clip_weights_hash(config: ClipConfig, tensor_shas: Mapping[str, str]) -> str:
    """sha256 over the config and every tensor's registry digest: the same weights give the same hash
    whether they come from the registry (digests read from the manifest) or from a folder."""
    h = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode())
    for name, sha in sorted(tensor_shas.items()):
        h.update(f"{name}\t{sha}\n".encode())
    return h.hexdigest()


def tensor_sha(tensor: Tensor) -> str:
    return tensor_digest(dtype_name(tensor.dtype), tuple(tensor.shape), tensor_bytes(tensor))


class ClipEncoder:
    """A CLIP model with its preprocessing and tokenizer: images and texts in, unit-length features out.

    `id` names the encoder (the registry ref, or the folder it was read from) and `weights_hash` fixes
    its exact weights and preprocessing, so a stored embedding can tell which encoder made it.
    """

    def __init__(self, model: CLIP, config: ClipConfig, id: str, weights_hash: str):
        self.model = model
        self.config = config
        self.id = id
        self.weights_hash = weights_hash
        self.tokenizer = SimpleTokenizer(context_length=config.context_length)
        device = next(model.parameters()).device
        self._mean = torch.tensor(config.image_mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(config.image_std, device=device).view(1, 3, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """tau = exp(learned log-scale), capped at 100: multiplies cosine similarities into logits."""
        return float(min(self.model.logit_scale.detach().exp().item(), MAX_LOGIT_SCALE))

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    def preprocess(self, images: np.ndarray | Tensor) -> Tensor:
        """uint8 (N, H, W, 3) or (H, W, 3) -> the float (N, 3, S, S) batch the vision tower reads."""
        batch = _as_image_batch(images).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        size = self.config.image_size
        if batch.shape[-2:] != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.normalise(batch)

    def normalise(self, x: Tensor) -> Tensor:
        """Float images (N, 3, S, S) in [0, 1] -> the vision tower's input (per-channel mean and std)."""
        return (x - self._mean) / self._std

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise BadInput("texts must be a list of strings")
        return self.tokenizer(list(texts)).to(self.device)

    def encode_images(self, images: np.ndarray | Tensor, batch_size: int = 512) -> np.ndarray:
        """L2-normalised image features, float32 (N, embed_dim); images are uint8 (N, H, W, 3)."""
        batch = _as_image_batch(images)
        return self._batched(lambda b: self.model.encode_image(self.preprocess(b), normalize=True), batch, batch_size)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
        """L2-normalised text features, float32 (N, embed_dim)."""
        tokens = self.tokenize(texts)
        return self._batched(lambda b: self.model.encode_text(b, normalize=True), tokens, batch_size)

    def _batched(self, encode: Callable[[Tensor], Tensor], items: Tensor, batch_size: int) -> np.ndarray:
        if batch_size < 1:
            raise BadInput(f"batch_size must be >= 1, got {batch_size}")
        with torch.inference_mode():
            parts = [encode(items[i : i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, self.embed_dim), np.float32)


def _as_image_batch(images: np.ndarray | Tensor) -> Tensor:
    batch = images if isinstance(images, Tensor) else torch.from_numpy(np.array(images))
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
        raise BadInput(
            f"expected uint8 RGB images shaped (N, H, W, 3), got {batch.dtype} {tuple(batch.shape)}; convert "
            "with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    return batch


def clip_from_tensors(config: ClipConfig, tensors: Mapping[str, Tensor], what: str, device: str = "cpu") -> CLIP:
    """The CLIP that `config` describes, whose parameters ARE `tensors` (no copy on the CPU), in eval mode."""
    with empty_parameters():
        model = build_clip(config.model_cfg)
    assign_weights(model, tensors, what)
    return model.to(device).eval().requires_grad_(False)


def save_clip(model: CLIP, config: ClipConfig, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` into `directory` (created if needed); returns it."""
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(model.state_dict().items())}
    with open(out / WEIGHTS_FILE, "wb") as f:
        write_tensors(f, tensors, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return out


def load_clip(directory: str | Path, device: str = "cpu") -> ClipEncoder:
    """Read a folder written by `save_clip` or `zoo export` into an encoder, without a registry."""
    root = Path(directory)
    if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise BadInput(f"{root} is not a CLIP folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = ClipConfig.from_json(json.loads((root / CONFIG_FILE).read_text()))
    tensors = {info.name: tensor for info, tensor in iter_tensors(root / WEIGHTS_FILE)}
    model = clip_from_tensors(config, tensors, str(root), device)
    digests = {name: tensor_sha(t) for name, t in tensors.items()}
    return ClipEncoder(model, config, str(root.resolve()), clip_weights_hash(config, digests))


class ClipFamily:
    """The `clip` family adapter: an open_clip CLIP as one module (tensor names = its state-dict keys)."""

    name: ClassVar[str] = "clip"
    takes_prompts: ClassVar[bool] = False
    needs_prompt: ClassVar[bool] = False

    def load(self, registry: Registry, ref: str, device: str = "cpu") -> LoadedModel:
        info, config_json = stored_json_config(registry, ref, self.name, CONFIG_FILE, "save_clip")
        config = ClipConfig.from_json(config_json)
        model = clip_from_tensors(config, registry.load_tensors(info.ref), info.ref, device)
        digests = {name: blob.sha256 for (kind, name), blob in registry.manifest(info.ref).items() if kind == "tensor"}
        encoder = ClipEncoder(model, config, info.ref, clip_weights_hash(config, digests))
        return LoadedModel(
            ref=info.ref, family=self.name, pipeline=encoder, modules={"": model}, tokenizer=encoder.tokenizer,
            config=config_json,
        )

    def sample(
        self, model: LoadedModel, seeds: Sequence[int], prompt: str | None = None, **options: Any
    ) -> list[Sample]:
        raise BadInput(
            f"an encoder cannot be sampled: {model.ref} is a CLIP model; use it to embed images and texts "
            "(`zoo index --encoder`) instead"
        )

    def editable_tensors(self, model: LoadedModel) -> list[str]:
        return []
