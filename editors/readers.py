"""Attribute readers: how the concept editors see what a pipeline draws (UCE's debias loop, ESD's
`read_until`). A reader takes uint8 images and the attribute names and says which attribute each image
shows. The toolkit's own is CLIP zero-shot classification; the registry's CLIP model is the default, and a
caller may hand in any other (the shapes world's meters, for the demo)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from modelzoo.editors.diffusion_text import in_template
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, get_family
from modelzoo.registry.queries import ListFilter, list_models

if TYPE_CHECKING:
    from modelzoo.registry.families.clip import ClipEncoder
    from modelzoo.registry.store import Registry

AttributeReader = Callable[[np.ndarray, Sequence[str]], list[str | None]]
"""uint8 images (N, H, W, 3) and the attribute names -> the attribute read in each image (None: none)."""

CLIP_READER = "clip"
"""The reader name that stands for the registry's only CLIP model."""
ZOO_CLIP_PREFIX = "clip:zoo:"
"""`clip:zoo:REF` names a CLIP version of the registry."""


def clip_reader(encoder: ClipEncoder, templates: Sequence[str]) -> AttributeReader:
    """CLIP zero-shot classification (Radford et al., arXiv 2103.00020, sec. 3.1.4): each image reads as
    the attribute whose prompts its features match best. An attribute's prompts are the attribute placed
    in each of `templates`, their normalised text features averaged (prompt ensembling)."""

    def read(images: np.ndarray, attributes: Sequence[str]) -> list[str | None]:
        T = np.stack([encoder.encode_texts([in_template(t, a) for t in templates]).mean(0) for a in attributes])
        T /= np.linalg.norm(T, axis=1, keepdims=True)
        scores = encoder.encode_images(images) @ T.T
        return [attributes[i] for i in scores.argmax(1)]

    return read


@torch.no_grad()
def read_drawn(model: LoadedModel, prompts: str | Sequence[str], count: int, seed: int, reader: AttributeReader,
               attributes: Sequence[str], **sampling: Any) -> list[str | None]:
    """Draw `count` images of each prompt with the model's pipeline (noise from `seed`, the pipeline's own
    settings unless `sampling` overrides them) and read each with `reader` among `attributes`."""
    images = model.pipeline(prompts, num_images_per_prompt=count, generator=torch.Generator().manual_seed(seed),
                            output_type="np", **sampling).images
    return reader((np.asarray(images) * 255).round().clip(0, 255).astype(np.uint8), attributes)


def registry_clip_reader(registry: Registry, reader: str, templates: Sequence[str]) -> tuple[str, AttributeReader]:
    """(the reader's full name `clip:zoo:REF`, the reader) for "clip" (the registry's only CLIP model) or
    "clip:zoo:REF"."""
    ref = _clip_version(registry, reader)
    encoder: ClipEncoder = get_family("clip").load(registry, ref).pipeline
    return f"{ZOO_CLIP_PREFIX}{ref}", clip_reader(encoder, templates)


def _clip_version(registry: Registry, reader: str) -> str:
    """The CLIP version a reader name stands for: the registry's only `clip` model, or the one named."""
    if reader.startswith(ZOO_CLIP_PREFIX):
        info = registry.info(reader.removeprefix(ZOO_CLIP_PREFIX))
        if info.family != "clip":
            raise BadInput(f"the reader {info.ref} is a {info.family} model, not a clip model")
        return info.ref
    if reader != CLIP_READER:
        raise BadInput(f"the reader {reader!r} is not one the registry holds: use 'clip' (its CLIP "
                       "model) or 'clip:zoo:REF', or hand the reader in as `read`")
    models = list_models(registry, ListFilter(family="clip"))
    if not models:
        raise BadInput("reading images takes the registry's CLIP model and it has none: import one "
                       "(a clip folder) or choose a reader (--reader clip:SPEC)")
    if len(models) > 1:
        raise BadInput(f"the registry has {len(models)} CLIP models ({', '.join(m.name for m in models)}): "
                       "choose the reader with --reader clip:zoo:NAME")
    return f"{models[0].name}@{models[0].latest}"
