"""A circuit knocked out in a child's weights, for necessity tests of a `circuit` analysis (Davies et al.
2023, arXiv 2307.03637; `modelzoo.analyses.circuit`).

A head's output is its slice of the attention output projection's input, h_j; the projection computes
W_O [h_1; ...; h_H] + b = sum_j W_O[:, j] h_j + b. A component is knocked out at every position:

- zero mode: W_O[:, j] = 0 for each knocked head j (the head contributes nothing); a knocked MLP gets its
  output projection's weight, and its bias if it has one, zeroed.
- mean mode: W_O[:, j] = 0 and b += W_O[:, j] mean_j, with mean_j the head's mean output stored by the
  analysis, so the head always contributes its mean; a knocked MLP gets its output projection's weight
  zeroed and its bias set to the MLP's mean output. This is exactly the analysis's mean ablation, so the
  child's accuracy is the analysis's `ablated_accuracy` on the same prompts.

GPT-2's Conv1D projections store (in, out) and carry biases already. A Llama-style model without the bias
a mean needs gets that bias group switched on (`editors/lm_bias.py`): zero biases everywhere and the flag
set in its config, so transformers loads the child.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import torch

from modelzoo.analyses.circuit import Component, parse_component
from modelzoo.editors.lm_bias import zero_biases
from modelzoo.registry.analyses import analysis_of, analysis_tensors
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.store import Registry
from modelzoo.registry.untrusted import parse_json_object

Mode = Literal["zero", "mean"]


@dataclass(frozen=True)
class Knockout:
    analysis: int  # a stored `circuit` analysis of the version being edited
    mode: Mode = "mean"


@dataclass(frozen=True)
class _Projection:
    """An output projection's weight and bias names, and which axis of the weight is its input."""

    weight: str
    bias: str
    input_axis: int


def _projections(tensors: dict[str, torch.Tensor], layer: int) -> tuple[_Projection, _Projection]:
    """(attention output projection, MLP output projection) of a layer, GPT-2's or Llama's."""
    if f"transformer.h.{layer}.attn.c_proj.weight" in tensors:
        return (_Projection(f"transformer.h.{layer}.attn.c_proj.weight", f"transformer.h.{layer}.attn.c_proj.bias", 0),
                _Projection(f"transformer.h.{layer}.mlp.c_proj.weight", f"transformer.h.{layer}.mlp.c_proj.bias", 0))
    attn, mlp = f"model.layers.{layer}.self_attn.o_proj", f"model.layers.{layer}.mlp.down_proj"
    if f"{attn}.weight" not in tensors or f"{mlp}.weight" not in tensors:
        raise BadInput(f"no layer {layer} with a known attention and MLP output projection (GPT-2's c_proj or "
                       "Llama's o_proj and down_proj)")
    return _Projection(f"{attn}.weight", f"{attn}.bias", 1), _Projection(f"{mlp}.weight", f"{mlp}.bias", 1)


def knockout_changes(tensors: dict[str, torch.Tensor], config: dict[str, object], knocked: list[Component],
                     mode: Mode, head_means: torch.Tensor, mlp_means: torch.Tensor
                     ) -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """(changed tensors, the Llama bias flags to switch on)."""
    changed: dict[str, torch.Tensor] = {}
    flags: dict[str, bool] = {}

    def current(name: str) -> torch.Tensor:
        return changed[name] if name in changed else tensors[name]

    def bias(name: str, flag: str) -> torch.Tensor:
        if name not in changed and name not in tensors:
            if config.get("model_type") != "llama":
                raise BadInput(f"{name} does not exist and only Llama configs say how to add it; use --mode zero")
            changed.update(zero_biases(tensors, flag))
            flags[flag] = True
        return current(name)

    layers, heads, d = head_means.shape
    for c in knocked:
        if not 0 <= c.layer < layers or (c.head is not None and not 0 <= c.head < heads):
            raise BadInput(f"{c.name} is not a component of a model with {layers} layers of {heads} heads")
        attn, mlp = _projections(tensors, c.layer)
        if c.head is not None:
            W = current(attn.weight).clone()
            cols = W.narrow(attn.input_axis, c.head * d, d)
            if mode == "mean":
                b = bias(attn.bias, "attention_bias")
                mean = head_means[c.layer, c.head].to(torch.float64)
                W_j = cols.to(torch.float64)
                shift = W_j @ mean if attn.input_axis == 1 else mean @ W_j
                changed[attn.bias] = (b.to(torch.float64) + shift).to(b.dtype)
            cols.zero_()
            changed[attn.weight] = W
        else:
            changed[mlp.weight] = torch.zeros_like(current(mlp.weight))
            if mode == "mean":
                b = bias(mlp.bias, "mlp_bias")
                changed[mlp.bias] = mlp_means[c.layer].to(b.dtype)
            elif mlp.bias in tensors or mlp.bias in changed:
                changed[mlp.bias] = torch.zeros_like(current(mlp.bias))
    return changed, flags


def knock_out(registry: Registry, ref: str, request: Knockout, name: str | None = None) -> VersionInfo:
    """Register a child of `ref` with the circuit of a stored `circuit` analysis knocked out."""
    if request.mode not in ("zero", "mean"):
        raise BadInput(f"--mode is zero or mean, not {request.mode!r}")
    info = registry.info(ref)
    analysis = analysis_of(registry, request.analysis, "circuit", "a circuit", info.ref)
    knocked = [parse_component(n) for n in analysis.metrics["components"]]
    if not knocked:
        raise BadInput(f"analysis {analysis.id} found no components to knock out")
    stored = analysis_tensors(registry, analysis.id)
    files = registry.load_files(info.ref)
    if "config.json" not in files:
        raise BadInput(f"{info.ref} has no config.json, so its architecture is unknown")
    config = parse_json_object(files["config.json"], f"{info.ref}'s config.json")
    changed, flags = knockout_changes(registry.load_tensors(info.ref), config, knocked, request.mode,
                                      stored["head_means"], stored["mlp_means"])
    new_files = {"config.json": json.dumps({**config, **flags}, indent=2, sort_keys=True).encode()} if flags else {}
    params = {"analysis": analysis.id, "analysis_input_hash": analysis.input_hash, "mode": request.mode,
              "components": [c.name for c in knocked], "biases_added": sorted(flags)}
    return registry.commit(info.ref, changed, "ablate", params, {"component_count": len(knocked)}, name=name,
                           files=new_files)
