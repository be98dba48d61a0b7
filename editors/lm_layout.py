"""Where a causal LM keeps its transformer blocks and MLP down-projections, per architecture.

Locate-then-edit methods (ROME, MEMIT, AlphaEdit) write into the MLP's output projection, whose input is
the key k and whose output is added to the residual stream. The module names follow the reference's
`rewrite_module_tmp` / `layer_module_tmp` templates: GPT-2 `transformer.h.{}.mlp.c_proj` (a Conv1D, weight
stored input x output), GPT-J `transformer.h.{}.mlp.fc_out`, GPT-NeoX `gpt_neox.layers.{}.mlp.dense_4h_to_h`,
Llama-style (Llama, Mistral, Qwen2, SmolLM2, ...) `model.layers.{}.mlp.down_proj` (nn.Linear, output x input).
Any template can be overridden.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from modelzoo.registry.errors import BadInput


@dataclass(frozen=True)
class LmLayout:
    """Module-name templates (`{}` = layer number) and the shapes MEMIT needs."""

    arch: str  # "gpt2" | "gptj" | "gpt_neox" | "llama"
    block: str
    down_proj: str
    n_layers: int
    hidden: int  # the residual stream's width: the down-projection's output
    key_dim: int  # the down-projection's input
    weight_is_input_major: bool  # GPT-2's Conv1D stores (input, output); nn.Linear (output, input)

    def block_name(self, layer: int) -> str:
        return self.block.format(layer)

    def down_name(self, layer: int) -> str:
        return self.down_proj.format(layer)

    def weight_name(self, layer: int) -> str:
        return f"{self.down_proj.format(layer)}.weight"


_TEMPLATES: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h.{}", "transformer.h.{}.mlp.c_proj"),
    "gptj": ("transformer.h.{}", "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": ("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "llama": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
}


def _arch_of(lm: nn.Module) -> str:
    model_type = getattr(getattr(lm, "config", None), "model_type", "")
    if model_type in _TEMPLATES:
        return str(model_type)
    names = {n for n, _ in lm.named_modules()}
    # Llama's descendants (Mistral, Qwen2, Gemma, SmolLM2's "llama") share its module names.
    for arch, (_, down) in _TEMPLATES.items():
        if down.format(0) in names:
            return arch
    raise BadInput(
        f"no MEMIT layout for a {type(lm).__name__} ({model_type or 'unknown type'}); "
        "pass block and down_proj module templates"
    )


def layout_of(lm: nn.Module, block: str | None = None, down_proj: str | None = None) -> LmLayout:
    """The layout of `lm`, from its architecture, with either template overridden."""
    from transformers.pytorch_utils import Conv1D

    arch = _arch_of(lm) if block is None or down_proj is None else "custom"
    default_block, default_down = _TEMPLATES.get(arch, ("", ""))
    block, down_proj = block or default_block, down_proj or default_down
    for template in (block, down_proj):
        if template.count("{}") != 1:
            raise BadInput(f"module template {template!r} needs exactly one {{}} for the layer number")
    n_layers = 0
    while True:
        try:
            lm.get_submodule(block.format(n_layers))
        except AttributeError:
            break
        n_layers += 1
    try:
        module = lm.get_submodule(down_proj.format(0))
    except AttributeError:
        raise BadInput(f"{type(lm).__name__} has no module {down_proj.format(0)!r}") from None
    if n_layers == 0:
        raise BadInput(f"{type(lm).__name__} has no module {block.format(0)!r}")
    if isinstance(module, Conv1D):
        key_dim, hidden = module.weight.shape
        input_major = True
    elif isinstance(module, nn.Linear):
        hidden, key_dim = module.weight.shape
        input_major = False
    else:
        raise BadInput(f"{down_proj.format(0)} is a {type(module).__name__}, not a linear map")
    return LmLayout(arch, block, down_proj, n_layers, int(hidden), int(key_dim), input_major)
