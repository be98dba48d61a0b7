"""What the LM analyses need of a causal LM: its blocks, its attention heads' output projections, its
decoder head (final norm and unembedding), and last-token passes that reuse a prefix's key/value cache.

Llama-style models (Llama, SmolLM2, Mistral, Qwen2) and GPT-2 are known. Hidden states are the
residual stream after a block (the block's first output); `z` is the last block's output, which the head
decodes, as in the LRE paper (Hernandez et al. 2023, section 2).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel

# (blocks, attention output projection, final norm), `{}` = layer number
_ARCHS: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers.{}", "model.layers.{}.self_attn.o_proj", "model.norm"),
    "gpt2": ("transformer.h.{}", "transformer.h.{}.attn.c_proj", "transformer.ln_f"),
}


@dataclass(frozen=True)
class LmParts:
    lm: nn.Module
    tokenizer: Any
    arch: str
    n_layers: int
    n_heads: int
    hidden: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def block(self, layer: int) -> str:
        return _ARCHS[self.arch][0].format(layer)

    def attn_out(self, layer: int) -> str:
        return _ARCHS[self.arch][1].format(layer)

    def out_weight(self, layer: int) -> Tensor:
        """W_O as (hidden out, hidden in): the map from the concatenated heads to the residual stream."""
        weight = self.lm.get_submodule(self.attn_out(layer)).weight
        return weight.T if self.arch == "gpt2" else weight  # GPT-2's Conv1D stores (in, out)

    def decode(self, z: Tensor) -> Tensor:
        """Logits of the last block's output z (the final norm, then the unembedding)."""
        norm = self.lm.get_submodule(_ARCHS[self.arch][2])
        return self.lm.get_output_embeddings()(norm(z))

    def ids(self, text: str) -> list[int]:
        bos = self.tokenizer.bos_token_id
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return [bos, *ids] if bos is not None else ids

    def answer_token(self, answer: str) -> int:
        """The first token of an answer as it follows a prompt (after a space)."""
        ids = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
        if not ids:
            raise BadInput(f"answer {answer!r} tokenises to nothing")
        return int(ids[0])


def lm_parts(model: LoadedModel) -> LmParts:
    if model.family != "lm":
        raise BadInput(f"{model.ref} is a {model.family} model; this analysis needs a language model (family lm)")
    if model.tokenizer is None:
        raise BadInput(f"{model.ref} has no tokenizer files, so prompts cannot be encoded")
    lm = model.pipeline
    config = lm.config
    arch = "gpt2" if config.model_type == "gpt2" else "llama"
    try:
        lm.get_submodule(_ARCHS[arch][1].format(0))
    except AttributeError:
        raise BadInput(f"{model.ref} is a {config.model_type} model; known layouts: Llama-style and GPT-2") from None
    return LmParts(lm, model.tokenizer, arch, int(config.num_hidden_layers), int(config.num_attention_heads),
                   int(config.hidden_size))


def residual(output: Any) -> Tensor:
    """A block's residual-stream output (blocks return a tensor or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def with_residual(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@dataclass
class Prefix:
    """A prompt split before position `start`: the key/value cache of the tokens before it, and the rest.
    Passes over the rest reuse the cache, so only the last few tokens are recomputed."""

    cache: Any
    rest: Tensor  # (1, tokens from `start`)
    start: int
    ids: tuple[int, ...]  # the whole prompt

    def expanded(self, batch: int) -> Any:
        cache = copy.deepcopy(self.cache)
        if cache is not None and batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


@torch.no_grad()
def prefix(parts: LmParts, ids: Sequence[int], start: int, shared: Prefix | None = None) -> Prefix:
    """`ids` split before `start`. `shared`, the split of another prompt that begins with the same tokens
    (the same in-context examples), spares running the tokens before its own start again."""
    if not 0 <= start <= len(ids):
        raise ValueError(f"prefix split at {start} of {len(ids)} tokens")
    ids = tuple(ids)
    tokens = torch.tensor([ids], device=parts.lm.device)
    if start == 0:
        return Prefix(None, tokens, 0, ids)
    if shared is None or not 0 < shared.start <= start or shared.ids[: shared.start] != ids[: shared.start]:
        out = parts.lm(tokens[:, :start], use_cache=True)
    elif shared.start == start:
        return Prefix(shared.cache, tokens[:, start:], start, ids)
    else:
        out = parts.lm(tokens[:, shared.start:start], cache=shared.expanded(1), use_cache=True)
    return Prefix(out.cache, tokens[:, start:], start, ids)


def run_rest(parts: LmParts, pre: Prefix, batch: int = 1) -> Any:
    """The model over the prompt's rest, `batch` copies of it (editing hooks tell the copies apart)."""
    rest = pre.rest.expand(batch, -1)
    return parts.lm(rest, cache=pre.expanded(batch), use_cache=True)
