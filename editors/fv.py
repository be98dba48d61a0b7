"""A function vector baked into a child's weights (Todd et al. 2024, arXiv 2310.15213, section 3).

The `fv` analysis adds its vector v to the residual stream after block L at the last token only. Weights
cannot tell the last token from the others, so the child adds `scale * v` at every position, as a bias on
block L's MLP output projection (the MLP's output joins the residual stream at the end of the block):
GPT-2's `mlp.c_proj` has that bias already; a Llama-style model without one gets `mlp_bias` switched on in
its config, so transformers loads the child, with zero biases everywhere but at layer L. What this costs
the model's other abilities is measured by `benchmarks/analyses.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from modelzoo.editors.lm_bias import zero_biases
from modelzoo.registry.analyses import analysis_of, analysis_tensors
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.store import Registry
from modelzoo.registry.untrusted import parse_json_object


@dataclass(frozen=True)
class FvBake:
    analysis: int  # a stored `fv` analysis of the version being edited
    layer: int | None = None  # None: the analysis's layer
    scale: float = 1.0


def _bias_changes(tensors: dict[str, torch.Tensor], config: dict[str, object], layer: int,
                  v: torch.Tensor) -> tuple[dict[str, torch.Tensor], bool]:
    """(changed tensors, whether the config must switch `mlp_bias` on)."""
    gpt2 = f"transformer.h.{layer}.mlp.c_proj.bias"
    if gpt2 in tensors:
        return {gpt2: tensors[gpt2] + v.to(tensors[gpt2].dtype)}, False
    down = f"model.layers.{layer}.mlp.down_proj"
    if f"{down}.weight" not in tensors:
        raise BadInput(f"no block {layer} with an MLP output projection (GPT-2's mlp.c_proj or Llama's "
                       "mlp.down_proj) to carry the vector")
    if config.get("mlp_bias"):
        return {f"{down}.bias": tensors[f"{down}.bias"] + v.to(tensors[f"{down}.bias"].dtype)}, False
    changed = zero_biases(tensors, "mlp_bias")
    changed[f"{down}.bias"] = v.to(changed[f"{down}.bias"].dtype)
    return changed, True


def bake_function_vector(registry: Registry, ref: str, bake: FvBake, name: str | None = None) -> VersionInfo:
    """Register a child of `ref` whose weights add the analysis's function vector after its layer."""
    info = registry.info(ref)
    analysis = analysis_of(registry, bake.analysis, "fv", "a function vector (fv)", info.ref)
    layer = int(analysis.metrics["layer"]) if bake.layer is None else bake.layer
    v = bake.scale * analysis_tensors(registry, analysis.id)["function_vector"]
    files = registry.load_files(info.ref)
    if "config.json" not in files:
        raise BadInput(f"{info.ref} has no config.json, so its architecture is unknown")
    config = parse_json_object(files["config.json"], f"{info.ref}'s config.json")
    changed, needs_bias = _bias_changes(registry.load_tensors(info.ref), config, layer, v)
    new_files = {}
    if needs_bias:
        new_files["config.json"] = json.dumps({**config, "mlp_bias": True}, indent=2, sort_keys=True).encode()
    params = {"analysis": analysis.id, "analysis_input_hash": analysis.input_hash, "layer": layer,
              "scale": bake.scale, "heads": analysis.metrics.get("heads"), "mlp_bias_added": needs_bias}
    return registry.commit(info.ref, changed, "fv", params, {"vector_norm": float(v.norm())}, name=name,
                           files=new_files)
