"""The family adapter interface: how a registered version becomes a live model, and back.

One module per family (`diffusion`, `lm`, `gan`), each registered under the entry-point group
`modelzoo.families`, so a third party can add a family without touching this repository. Search and
every editor go through this interface; none of them builds a model itself.

Tensor names are the registry's: `unet/down_blocks.0...attn2.to_k.weight` for a diffusers pipeline
(component folder, then the component's state-dict key), plain state-dict keys for an LM or a GAN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.store import Registry


@dataclass
class LoadedModel:
    """A version materialised as live torch objects.

    `modules` maps a component name ("" for single-module families) to the nn.Module whose state-dict
    keys, prefixed with "component/", are the registry's tensor names. `pipeline` is the native object
    a user would hold (a diffusers pipeline, a transformers model, a Generator).
    """

    ref: str
    family: str
    pipeline: Any
    modules: dict[str, torch.nn.Module]
    tokenizer: Any = None
    config: dict[str, Any] = field(default_factory=dict)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LoadedModel:
        """Move every module, and so the pipeline that holds them, to `device`, and its floating-point
        parameters and buffers to `dtype`."""
        for module in self.modules.values():
            module.to(device=device, dtype=dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the model's parameters (the first module's first such parameter)."""
        return next(p.dtype for m in self.modules.values() for p in m.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(p.device for m in self.modules.values() for p in m.parameters())

    def tensor(self, name: str) -> torch.Tensor:
        component, key = self.split(name)
        return self.modules[component].state_dict()[key]

    def split(self, name: str) -> tuple[str, str]:
        head, sep, rest = name.partition("/")
        if sep and head in self.modules:
            return head, rest
        if "" in self.modules:
            return "", name
        raise BadInput(f"{self.ref} has no tensor {name!r}")

    def named_tensors(self) -> dict[str, torch.Tensor]:
        return {
            (f"{component}/{key}" if component else key): value
            for component, module in self.modules.items()
            for key, value in module.state_dict().items()
        }


@dataclass(frozen=True)
class Sample:
    """One sample for one seed: an image (uint8 HxWx3) or a text."""

    seed: int
    prompt: str | None
    image: np.ndarray | None = None
    text: str | None = None


def contact_sheet(images: Sequence[np.ndarray]) -> Image.Image:
    """Images (uint8 HxWx3) tiled row by row in a near-square grid, each in a cell of the largest size."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_h = max(im.shape[0] for im in images)
    cell_w = max(im.shape[1] for im in images)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, im in enumerate(images):
        sheet.paste(Image.fromarray(im), ((i % cols) * cell_w, (i // cols) * cell_h))
    return sheet


@runtime_checkable
class Family(Protocol):
    name: ClassVar[str]
    takes_prompts: ClassVar[bool]  # diffusion and lm sample from prompts; a GAN does not
    needs_prompt: ClassVar[bool]  # diffusion cannot sample without one

    def load(self, registry: Registry, ref: str, device: str = "cpu") -> LoadedModel: ...

    def sample(
        self, model: LoadedModel, seeds: Sequence[int], prompt: str | None = None, **options: Any
    ) -> list[Sample]:
        """One sample per seed; the same version and seed always give the same bytes, and a seed means
        the same starting latent/noise for every version of a model, so parent and child compare."""
        ...

    def editable_tensors(self, model: LoadedModel) -> list[str]:
        """The registry tensor names that this family's editors may change."""
        ...


def stored_json_config(
    registry: Registry, ref: str, family: str, filename: str, writer: str
) -> tuple[VersionInfo, dict[str, Any]]:
    """A single-module family's version and its JSON config file, refusing a version of another family
    or one whose config is missing or unreadable (`writer` names the function that writes such folders)."""
    info = registry.info(ref)
    if info.family != family:
        raise BadInput(f"{info.ref} is a {info.family} model, not a {family} model")
    files = registry.load_files(info.ref)
    if filename not in files:
        raise BadInput(f"{info.ref} has no {filename}; re-import it from a folder written by {writer}")
    try:
        config = json.loads(files[filename])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{info.ref}: {filename} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{info.ref}: {filename} is not a JSON object")
    return info, config


def family_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="modelzoo.families"))


def get_family(name: str) -> Family:
    """The adapter registered under `name` in the `modelzoo.families` entry points (only that one is
    imported, so a broken third-party plugin does not break the others)."""
    found = [ep for ep in entry_points(group="modelzoo.families") if ep.name == name]
    if not found:
        raise BadInput(f"unknown model family {name!r}; installed: {', '.join(family_names())}")
    family: Family = found[0].load()()
    return family
