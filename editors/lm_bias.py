"""Biases a Llama-style model leaves off, switched on so that an edit can write into one.

Llama's config turns biases on per group: `mlp_bias` for the MLP's gate, up and down projections,
`attention_bias` for the attention's q, k, v and output projections. A child that needs one bias of a
group gets zero biases for the whole group in every layer and the flag set in its config, so transformers
loads it with the same architecture everywhere and the same function wherever the edit wrote nothing.
"""

from __future__ import annotations

import torch

LLAMA_BIAS_GROUPS: dict[str, tuple[str, ...]] = {
    "mlp_bias": ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"),
    "attention_bias": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.o_proj.weight"),
}


def zero_biases(tensors: dict[str, torch.Tensor], flag: str) -> dict[str, torch.Tensor]:
    """A zero bias beside every weight of the flag's group (the changes that switch `flag` on)."""
    changed = {}
    for name, weight in tensors.items():
        if name.endswith(LLAMA_BIAS_GROUPS[flag]):
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            changed[name.removesuffix("weight") + "bias"] = bias
    return changed
