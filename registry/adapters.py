"""LoRA adapters: `zoo import ADAPTER --name NAME --base REF` registers an adapter as a child of a
registered base whose changed tensors are factored (`registry/factors.py`), and `zoo export REF DIR
--format lora` writes such a child back as an adapter of its parent.

Formats read:
- a PEFT folder: `adapter_config.json` with `adapter_model.safetensors` (or `.bin`, read by torch's
  weights-only loader), for an LM or for one diffusers component; a diffusion adapter may also hold one
  such folder per component (`unet/`, `text_encoder/`);
- a diffusers LoRA file (`pytorch_lora_weights.safetensors`: `unet.`/`text_encoder.` keys, old and new
  layouts, its `lora_adapter_metadata`);
- a kohya / A1111 file (`lora_unet_*`, `lora_te_*` keys with `.alpha`).

Each is interpreted by the library that defines it, so the scale rules are theirs: PEFT's `LoraConfig`
(alpha / r, alpha / sqrt(r) with `use_rslora`, `rank_pattern`, `alpha_pattern`, `fan_in_fan_out`) and
diffusers' own LoRA loading and kohya conversion (per-module `.alpha` / r). Both put PEFT LoRA layers
into the base loaded from the registry; each layer's A, B and scaling become a factored change of the
weight it wraps. Files are read only through the registry's checked readers (never unpickled, links out
refused, JSON bounded), and every A/B pair is checked (ranks agree, values finite) before any model is
built. An adapter that does not fit its base is refused whole, with nothing stored.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelzoo.registry.errors import BadInput
from modelzoo.registry.factors import LowRank, factor_rows
from modelzoo.registry.families.base import LoadedModel, get_family
from modelzoo.registry.files import SourceFolder
from modelzoo.registry.formats import load_pickle_weights, tensor_name
from modelzoo.registry.safetensors_io import iter_tensors, read_header
from modelzoo.registry.store import Registry
from modelzoo.registry.untrusted import parse_json_object

ADAPTER = "zoo"  # the adapter's name while PEFT holds its layers
RELATION = "adapter"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA = "lora_adapter_metadata"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
MAX_CONFIG_BYTES = 2**20
# The down (A) half of a LoRA pair in each layout, and the up (B) half that goes with it.
PAIR = re.compile(r"(lora_A|lora_down|lora\.down|_lora\.down|lora_linear_layer\.down|lora_embedding_A)(?=\.|$)")
PARTNER = {"lora_A": "lora_B", "lora_down": "lora_up", "lora.down": "lora.up", "_lora.down": "_lora.up",
           "lora_linear_layer.down": "lora_linear_layer.up", "lora_embedding_A": "lora_embedding_B"}
UNSUPPORTED_KEYS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr"}


@dataclass
class AdapterPart:
    """One adapter's tensors and its PEFT config (empty for diffusers and kohya files)."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterSource:
    """An adapter read from disk, not yet applied: per component ("" = the whole model, or unknown)."""

    path: Path
    format: str  # "peft" | "diffusers" | "kohya"
    parts: dict[str, AdapterPart]
    metadata: dict[str, Any] = field(default_factory=dict)  # diffusers' lora_adapter_metadata
    originals: dict[str, Path] = field(default_factory=dict)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts.values() for t in p.tensors.values())

    def record(self) -> dict[str, Any]:
        """What provenance keeps: the format and each part's config (or the file's metadata)."""
        configs = {component or "model": part.config for component, part in self.parts.items() if part.config}
        return {"format": self.format, "configs": configs, "metadata": self.metadata}


def adapter_format(path: Path) -> str | None:
    """The adapter format `path` holds, or None when it is not an adapter (a model to import as such)."""
    if path.is_dir():
        if (path / PEFT_CONFIG).is_file():
            return "peft"
        if (path / "model_index.json").exists() or (path / "config.json").exists():
            return None  # a model folder, whatever its component folders hold
        if any((p / PEFT_CONFIG).is_file() for p in path.iterdir() if p.is_dir()):
            return "peft"
        weights = path / DIFFUSERS_WEIGHTS
        if weights.is_symlink():  # not read here: the folder walk of `read_adapter` decides whether it may be
            return "diffusers"
        return _file_format(weights) if weights.is_file() else None
    return _file_format(path) if path.suffix == ".safetensors" and path.is_file() else None


def _file_format(path: Path) -> str | None:
    keys = list(read_header(path).tensors)
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if keys and all(PAIR.search(k) or _partner_half(k) or k.endswith(".alpha") for k in keys):
        return "diffusers"
    return None


def _partner_half(key: str) -> bool:
    return any(re.search(re.escape(up) + r"(?=\.|$)", key) for up in PARTNER.values())


def read_adapter(path: Path, follow_symlinks: bool = False) -> AdapterSource:
    """Read an adapter's tensors and configs through the registry's checked readers, and check its pairs."""
    kind = adapter_format(path)
    if kind is None:
        raise BadInput(f"{path} is no LoRA adapter (a PEFT folder, a diffusers LoRA file or a kohya file)")
    if kind == "peft":
        source = _read_peft(SourceFolder(path, follow_symlinks))
    else:
        file = path / DIFFUSERS_WEIGHTS if path.is_dir() else path
        if path.is_dir():  # links out of the folder are refused, as for every import
            file = SourceFolder(path, follow_symlinks).files[DIFFUSERS_WEIGHTS]
        kind = _file_format(file) or ""
        if not kind:
            raise BadInput(f"{file} holds no LoRA pairs in the diffusers or kohya layout")
        header = read_header(file)
        raw = header.metadata.get(DIFFUSERS_METADATA)
        metadata = parse_json_object(raw.encode(), f"{file}: {DIFFUSERS_METADATA}") if raw else {}
        tensors = {info.name: tensor for info, tensor in iter_tensors(file)}
        source = AdapterSource(file, kind, {"": AdapterPart(tensors)}, metadata, {file.name: file})
    for component, part in source.parts.items():
        _check_pairs(part.tensors, f"{source.path}{'/' + component if component else ''}")
    return source


def _read_peft(folder: SourceFolder) -> AdapterSource:
    components = [""] if folder.has_file(PEFT_CONFIG) else sorted(
        f for f in folder.folders if f and "/" not in f and folder.has_file(f"{f}/{PEFT_CONFIG}"))
    source = AdapterSource(folder.root, "peft", {})
    for component in components:
        prefix = f"{component}/" if component else ""
        config = parse_json_object(folder.read(prefix + PEFT_CONFIG, MAX_CONFIG_BYTES, "adapter config"),
                                   str(folder.root / (prefix + PEFT_CONFIG)))
        weights = next((prefix + w for w in PEFT_WEIGHTS if folder.has_file(prefix + w)), None)
        if weights is None:
            raise BadInput(f"{folder.root / component}: {PEFT_CONFIG} without {' or '.join(PEFT_WEIGHTS)}")
        file = folder.files[weights]
        tensors = ({info.name: t for info, t in iter_tensors(file)} if weights.endswith(".safetensors")
                   else load_pickle_weights(file))
        source.parts[component] = AdapterPart(tensors, config)
        source.originals[weights] = file
    return source


def _check_pairs(tensors: Mapping[str, torch.Tensor], what: str) -> int:
    """The number of A/B pairs; BadInput for a half without its partner, ranks that disagree, values that
    are not finite, or a kind of adapter other than LoRA."""
    for marker, kind in UNSUPPORTED_KEYS.items():
        if any(marker in key for key in tensors):
            raise BadInput(f"{what} is a {kind} adapter; only LoRA adapters are imported")
    pairs = 0
    paired: set[str] = set()
    for key, A in tensors.items():
        match = PAIR.search(key)
        if match is None:
            continue
        partner = key[: match.start()] + PARTNER[match.group(1)] + key[match.end():]
        B = tensors.get(partner)
        if B is None:
            raise BadInput(f"{what}: {key} has no {PARTNER[match.group(1)]} partner ({partner})")
        if B.ndim < 2 or A.ndim < 2 or A.shape[0] != B.shape[1]:
            raise BadInput(f"{what}: ranks disagree in {key} {tuple(A.shape)} and {partner} {tuple(B.shape)}")
        pairs += 1
        paired.update((key, partner))
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInput(f"{what}: {key} holds NaN or Inf values")
    unpaired = sorted(k for k in tensors if k not in paired and not k.endswith(".alpha"))
    if unpaired:
        raise BadInput(f"{what}: tensors that belong to no LoRA pair: {unpaired[:3]}")
    if pairs == 0:
        raise BadInput(f"{what} holds no LoRA pair")
    return pairs


def adapter_changes(model: LoadedModel, source: AdapterSource, stored: set[str]) -> dict[str, LowRank]:
    """Apply the adapter to a loaded base with its own library, and read each LoRA layer's change as
    factors of the registry tensor it wraps (`stored`: the base's tensor names)."""
    names = {id(t): tensor_name(component, key) for component, module in model.modules.items()
             for key, t in module.state_dict(keep_vars=True).items() if tensor_name(component, key) in stored}
    try:
        if source.format == "peft":
            for component, part in source.parts.items():
                _inject_peft(_component_for(model, component, part), part, str(source.path / component))
        else:
            _load_with_diffusers(model, source)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{source.path} does not fit {model.ref}: {first[:300]}") from None
    changes = _read_layers(model, names, source.path)
    expected = sum(_check_pairs(p.tensors, str(source.path)) for p in source.parts.values())
    if len(changes) != expected:
        raise BadInput(f"{source.path} holds {expected} LoRA pairs but only {len(changes)} fit modules of "
                       f"{model.ref}: its target modules do not match the base")
    if source.format == "kohya":
        scales = _kohya_scales(model, source.parts[""].tensors)
        changes = {n: dataclasses.replace(c, scale=scales.get(n, c.scale)) for n, c in changes.items()}
    return changes


def _kohya_scales(model: LoadedModel, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """kohya's rule, alpha / r for each module from its own `.alpha`, by registry tensor name.

    diffusers applies one most-common alpha to every module of an SD 1.x kohya file (its per-module
    alpha patterns name no module it targets), so each layer's scale is set here from the file itself."""
    scales: dict[str, float] = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        module = model.modules.get(component)
        for path, _ in module.named_modules() if module is not None else ():
            for named in (path, f"text_model.{path}"):  # newer transformers flatten CLIP's `text_model.`
                name = prefix + named.replace(".", "_")
                alpha, down = tensors.get(f"{name}.alpha"), tensors.get(f"{name}.lora_down.weight")
                if alpha is not None and down is not None and alpha.numel() == 1:
                    scales[tensor_name(component, f"{path}.weight")] = float(alpha) / down.shape[0]
    return scales


def _component_for(model: LoadedModel, component: str, part: AdapterPart) -> nn.Module:
    """The module a PEFT part adapts: its folder's component, the single module of an LM, or the one
    component that has every module the adapter's weights name."""
    if component:
        if component not in model.modules:
            raise BadInput(f"{model.ref} has no component {component!r} for the adapter in {component}/")
        return model.modules[component]
    if "" in model.modules:
        return model.modules[""]
    targets = {_module_path(k) for k in part.tensors}
    fitting = [c for c, m in model.modules.items() if targets <= {n for n, _ in m.named_modules()}]
    if len(fitting) != 1:
        raise BadInput(f"cannot tell which component of {model.ref} the adapter is for (modules match "
                       f"{fitting or 'none'}); put it in a folder named after the component")
    return model.modules[fitting[0]]


def _module_path(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    match = PAIR.search(key) or re.search(r"\.(lora_B|lora_embedding_B)(?=\.|$)", key)
    return key[: match.start()].rstrip("._") if match else key


def _inject_peft(module: nn.Module, part: AdapterPart, what: str) -> None:
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = dict(part.config)
    if config.get("peft_type", "LORA") != "LORA":
        raise BadInput(f"{what} is a {config.get('peft_type')} adapter; only LoRA adapters are imported")
    for key, why in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases"), ("modules_to_save", "modules_to_save"),
                     ("trainable_token_indices", "trainable tokens")):
        if config.get(key):
            raise BadInput(f"{what} uses {why}, which is not stored as a low-rank change; not imported")
    known = {f.name for f in dataclasses.fields(LoraConfig)} - {"base_model_name_or_path", "revision"}
    lora = LoraConfig(**{k: v for k, v in config.items() if k in known and k != "peft_type"})
    lora.inference_mode = True
    inject_adapter_in_model(lora, module, adapter_name=ADAPTER)
    state = {k.removeprefix("base_model.model."): v for k, v in part.tensors.items()}
    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        raise BadInput(f"{what} does not match its config's target modules: "
                       f"{'weights for no module: ' + str(unexpected[:2]) if unexpected else ''}"
                       f"{'modules without weights: ' + str(missing[:2]) if missing else ''}")


def _load_with_diffusers(model: LoadedModel, source: AdapterSource) -> None:
    """diffusers' own LoRA loading: its kohya conversion, its alpha rule, its metadata."""
    pipe = model.pipeline
    if not hasattr(pipe, "lora_state_dict") or not hasattr(pipe, "load_lora_into_unet"):
        raise BadInput(f"{model.ref} ({type(pipe).__name__}) takes no diffusers or kohya LoRA file")
    state, alphas = pipe.lora_state_dict(dict(source.parts[""].tensors))
    metadata = source.metadata or None
    pipe.load_lora_into_unet(state, alphas, pipe.unet, adapter_name=ADAPTER, metadata=metadata)
    for name in ("text_encoder", "text_encoder_2"):
        if name in model.modules and any(k.startswith(f"{name}.") for k in state):
            pipe.load_lora_into_text_encoder(state, alphas, model.modules[name], prefix=name, adapter_name=ADAPTER,
                                             metadata=metadata)


def _read_layers(model: LoadedModel, names: Mapping[int, str], what: Path) -> dict[str, LowRank]:
    """Each PEFT LoRA layer's change of the weight it wraps, as `scale * B @ A` in the weight's layout."""
    from peft.tuners.lora import LoraLayer

    changes: dict[str, LowRank] = {}
    for module in model.modules.values():
        for path, layer in module.named_modules():
            if not isinstance(layer, LoraLayer) or ADAPTER not in layer.scaling:
                continue
            if layer.use_dora.get(ADAPTER) or layer.lora_bias.get(ADAPTER):
                raise BadInput(f"{what}: {path} uses DoRA or a LoRA bias; only plain LoRA is imported")
            weight = layer.get_base_layer().weight
            name = names.get(id(weight))
            if name is None:
                raise BadInput(f"{what}: {path} adapts a weight that {model.ref} does not store")
            changes[name] = _factors(layer, path, what)
    return changes


def _factors(layer: Any, path: str, what: Path) -> LowRank:
    scale = float(layer.scaling[ADAPTER])
    if ADAPTER in layer.lora_embedding_A:  # delta of the (num, dim) table is (B @ A)^T
        A, B = layer.lora_embedding_A[ADAPTER].detach(), layer.lora_embedding_B[ADAPTER].detach()
        return LowRank(A.T.clone(), B.T.clone(), scale)
    A, B = layer.lora_A[ADAPTER].weight.detach(), layer.lora_B[ADAPTER].weight.detach()
    if A.ndim == 4:  # a conv: A is (r, in, kh, kw) and B a 1x1 (out, r, 1, 1)
        if B.shape[2:] != (1, 1) or getattr(layer.get_base_layer(), "groups", 1) != 1:
            raise BadInput(f"{what}: {path} is a grouped or non-1x1-up conv LoRA, not a plain low-rank change")
        return LowRank(B.flatten(1).clone(), A.flatten(1).clone(), scale)
    if layer.fan_in_fan_out:  # a (in, out) weight (GPT-2's Conv1D): delta is (B @ A)^T
        return LowRank(A.T.clone(), B.T.clone(), scale)
    return LowRank(B.clone(), A.clone(), scale)


def rank_summary(changes: Mapping[str, LowRank]) -> dict[str, int]:
    """How many tensors each rank changes (provenance metrics)."""
    return {str(rank): count for rank, count in sorted(Counter(c.rank for c in changes.values()).items())}


def json_safe(value: Any) -> Any:
    """A config as provenance JSON (PEFT configs hold sets and tuples)."""
    return json.loads(json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set | frozenset) else str(v)))


def adapter_files(registry: Registry, ref: str) -> dict[str, bytes | dict[str, torch.Tensor]]:
    """A factored child written back as an adapter of its one parent: a PEFT folder for an LM
    (`adapter_config.json`, `adapter_model.safetensors`), a diffusers LoRA file for a diffusion pipeline.

    Ranks are padded with zeros to the largest one (exact), and each scale is folded into B, so alpha
    equals r everywhere and every reader's scale rule gives 1. Refused, naming the tensor, when the child
    changes anything that is not a factored change of its parent's tensor."""
    info = registry.info(ref)
    if len(info.parents) != 1:
        raise BadInput(f"{info.ref} has {len(info.parents)} parents; a LoRA export is relative to exactly one")
    parent = info.parents[0].ref
    mine, theirs = registry.manifest(info.ref), registry.manifest(parent)
    different = sorted(key for key, b in mine.items() if key not in theirs or theirs[key].sha256 != b.sha256)
    files = [n for k, n in different if k == "file"]
    dropped = [n for key in theirs if key not in mine for n in [key[1]]]
    if files or dropped or not different:
        what = f"changes files {files[:3]}" if files else f"removes {dropped[:3]}" if dropped else "changes nothing"
        raise BadInput(f"{info.ref} {what} of {parent}; only weight changes export as a LoRA adapter")
    changed = [n for _, n in different]
    with registry.db.read() as session:
        rows = factor_rows(session, [mine[("tensor", n)].sha256 for n in changed])
    changes: dict[str, LowRank] = {}
    for name in changed:
        base = theirs.get(("tensor", name))
        row = rows.get(mine[("tensor", name)].sha256)
        if row is None or base is None or row.base != base.sha256 or not name.endswith(".weight"):
            raise BadInput(f"{info.ref} changes {name} of {parent} as a dense tensor, not as factors over it; "
                           "export it whole (`zoo export REF DIR`)")
        changes[name] = LowRank(registry.blobs.get_tensor(row.b), registry.blobs.get_tensor(row.a), row.scale)
    model = get_family(info.family).load(registry, parent)
    layers = {tensor_name(c, path): (c, path, m) for c, module in model.modules.items()
              for path, m in module.named_modules()}
    rank = max(c.rank for c in changes.values())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, change in changes.items():
        component, path, layer = layers.get(name.removesuffix(".weight"), ("", "", None))
        if layer is None:
            raise BadInput(f"{name} belongs to no module of {parent}")
        pairs.setdefault(component, {}).update(_peft_pair(path, layer, _padded(change, rank)))
    if info.family == "lm":
        config = _peft_config(rank, sorted({p.rsplit(".lora_", 1)[0] for p in pairs[""]}),
                              any(_is_conv1d(layers[n.removesuffix(".weight")][2]) for n in changes), parent)
        return {PEFT_CONFIG: json.dumps(config, indent=2).encode(),
                PEFT_WEIGHTS[0]: {f"base_model.model.{k}": v for k, v in pairs[""].items()}}
    unknown = sorted(set(pairs) - {"unet", "text_encoder", "text_encoder_2"})
    if unknown:
        raise BadInput(f"{info.ref} changes component {unknown[0]!r}; a diffusers LoRA file adapts only the "
                       "UNet and the text encoders")
    return {DIFFUSERS_WEIGHTS: {f"{c}.{k}": v for c, group in sorted(pairs.items()) for k, v in group.items()}}


def _padded(change: LowRank, rank: int) -> LowRank:
    """The same change at a higher rank (zero columns of B, zero rows of A), its scale folded into B."""
    extra = rank - change.rank
    B = torch.cat([change.B * change.scale, change.B.new_zeros(change.B.shape[0], extra)], dim=1)
    A = torch.cat([change.A, change.A.new_zeros(extra, change.A.shape[1])], dim=0)
    return LowRank(B.contiguous(), A.contiguous())


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _peft_pair(path: str, layer: nn.Module, change: LowRank) -> dict[str, torch.Tensor]:
    """PEFT's keys and layouts for one layer's change (the inverse of `_factors`)."""
    B, A = change.B, change.A
    if isinstance(layer, nn.Embedding):
        return {f"{path}.lora_embedding_A": B.T.contiguous(), f"{path}.lora_embedding_B": A.T.contiguous()}
    if isinstance(layer, nn.Conv2d):
        out, inp, kh, kw = layer.weight.shape
        return {f"{path}.lora_A.weight": A.reshape(A.shape[0], inp, kh, kw).contiguous(),
                f"{path}.lora_B.weight": B.reshape(out, B.shape[1], 1, 1).contiguous()}
    if _is_conv1d(layer):
        return {f"{path}.lora_A.weight": B.T.contiguous(), f"{path}.lora_B.weight": A.T.contiguous()}
    if isinstance(layer, nn.Linear):
        return {f"{path}.lora_A.weight": A, f"{path}.lora_B.weight": B}
    raise BadInput(f"{path} is a {type(layer).__name__}; LoRA adapters adapt linear, conv and embedding layers")


def _peft_config(rank: int, targets: list[str], fan_in_fan_out: bool, parent: str) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "use_rslora": False,
            "target_modules": targets, "fan_in_fan_out": fan_in_fan_out, "bias": "none", "lora_dropout": 0.0,
            "inference_mode": True, "base_model_name_or_path": parent}
