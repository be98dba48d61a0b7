"""What the concept editors (UCE, ESD) share: a loaded pipeline's text side and its cross-attention.

A concept is a short text ("red", "Van Gogh"). Diffusion UNets read text only through the text
encoder's per-token outputs, which every cross-attention layer (`attn2`) projects with its key and
value matrices; both editors therefore start from the same three things, checked here once:
the tokenizer and text encoder, a concept's tokens (refused when it has none or too many), and the
names of the cross-attention projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel

UNET = "unet"
TEXT_ENCODER = "text_encoder"
CROSS_ATTENTION = "attn2"
"""diffusers names a transformer block's cross-attention `attn2` (self-attention is `attn1`)."""


@dataclass
class TextSide:
    """A loaded pipeline's UNet, text encoder and tokenizer, with the positions the tokenizer pads to."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    length: int

    def token_ids(self, text: str, what: str, allow_empty: bool = False) -> list[int]:
        """The concept's own tokens (no start/end markers), refusing an empty or over-long concept."""
        ids: list[int] = self.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        if not ids and not allow_empty:
            raise BadInput(f"{what} {text!r} tokenizes to nothing; give a word the text encoder knows")
        if len(ids) + 2 > self.length:
            raise BadInput(
                f"{what} {text!r} is {len(ids)} tokens; the text encoder reads at most {self.length - 2} "
                "plus its start and end markers"
            )
        return ids

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Per-token text-encoder outputs (n, length, d), float32: exactly what the UNet's cross-attention
        reads (padded to the full length, as the pipeline does)."""
        batch = self.tokenizer(  # type: ignore[operator]
            list(texts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        device = next(self.text_encoder.parameters()).device
        config = getattr(self.text_encoder, "config", None)
        # StableDiffusionPipeline.encode_prompt passes the mask only to encoders configured for it.
        mask = batch["attention_mask"].to(device) if getattr(config, "use_attention_mask", False) else None
        with torch.no_grad():
            hidden = self.text_encoder(batch["input_ids"].to(device), attention_mask=mask)[0]
        return hidden.float()


def in_template(template: str, concept: str) -> str:
    """The concept placed where the template's "{}" is, with runs of spaces (an empty concept) made one."""
    return " ".join(template.format(concept).split())


def text_side(model: LoadedModel) -> TextSide:
    """The UNet, text encoder and tokenizer of a loaded diffusion version, or BadInput naming what is missing."""
    missing = [name for name in (UNET, TEXT_ENCODER) if name not in model.modules]
    if missing or model.tokenizer is None:
        lacks = ", ".join(missing + ([] if model.tokenizer is not None else ["tokenizer"]))
        raise BadInput(f"{model.ref} is not a text-to-image pipeline with a UNet and a CLIP-style text encoder "
                       f"(it lacks {lacks})")
    length = int(getattr(model.tokenizer, "model_max_length", 77))
    positions = getattr(getattr(model.modules[TEXT_ENCODER], "config", None), "max_position_embeddings", length)
    return TextSide(model.modules[UNET], model.modules[TEXT_ENCODER], model.tokenizer, min(length, int(positions)))


def cross_attention_projections(unet: nn.Module, projections: Sequence[str], layers: Sequence[str] = ()) -> list[str]:
    """Names (in the UNet) of the cross-attention linear maps `attn2.<projection>` whose module name
    contains one of `layers` (all when empty), e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`."""
    found = [
        name
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear)
        and any(name.endswith(f"{CROSS_ATTENTION}.{p}") for p in projections)
        and (not layers or any(layer in name for layer in layers))
    ]
    if not found:
        where = f" matching {list(layers)}" if layers else ""
        raise BadInput(f"the UNet has no cross-attention {'/'.join(projections)} projections{where}")
    return found
