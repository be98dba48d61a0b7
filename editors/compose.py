"""Compose edits of one parent by adding their weight deltas.

Wang, Bau, Zhu, "Rewriting Geometric Rules of a GAN" (SIGGRAPH 2022), sec. 5 "model composition", as the
reference's `notebooks/compose_models.ipynb` does it: for edited models W_k of one original W_orig,

    W = W_orig + sum_k s_k (W_k - W_orig),   each s_k in [0, 1], default 1,

which works because each edit is a small (low-rank) change of a few layers, and changes of different
rules interfere little. Nothing here is GAN-specific: any family's edits of a shared parent compose.
The result is registered with every composed edit as a parent (relation "compose"), the first one
providing the manifest that the composed tensors replace.

A bias that the parent lacks is a zero bias, so a bias an edit adds composes as a change from zero: a
function vector baked into a Llama-style model (`editors/fv.py`) switches the MLP biases on, so two such
children compose to both vectors, each after its own layer, which is the function-vector paper's vector
composition (Todd et al. 2024, arXiv 2310.15213, section 5: v_A + v_B). Every edit must then add the same
biases and change the parent's files (its config.json) alike, so the composition loads as one model.

Where every edit of a tensor is stored as factors over the parent's tensor, so is the composition: over
the first edit's tensor it is (s_1 - 1) Delta_1 + sum_{k>1} s_k Delta_k, whose factors are the edits'
factors side by side (the ranks add up).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from modelzoo.registry.blobs import FACTORED
from modelzoo.registry.errors import BadInput
from modelzoo.registry.factors import LowRank, factor_rows
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.store import Registry

METHOD = "compose"
RELATION = "compose"


def _shared_parent(infos: Sequence[VersionInfo]) -> str:
    """The one version every edit was derived from; BadInput naming the culprit otherwise."""
    parents: dict[str, list[str]] = {}
    for info in infos:
        if len(info.parents) != 1:
            what = "no parent" if not info.parents else f"{len(info.parents)} parents"
            raise BadInput(f"{info.ref} has {what}; compose takes edits that each have exactly one parent")
        parents.setdefault(info.parents[0].ref, []).append(info.ref)
    if len(parents) != 1:
        listed = "; ".join(f"{', '.join(refs)} from {parent}" for parent, refs in parents.items())
        raise BadInput(f"compose needs edits of one shared parent, got {listed}")
    return next(iter(parents))


def _check_scales(scales: Sequence[float] | None, count: int) -> list[float]:
    if scales is None:
        return [1.0] * count
    if len(scales) != count:
        raise BadInput(f"give one scale per composed version: {count} versions, {len(scales)} scales")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not 0 <= s <= 1:
            raise BadInput(f"scales lie in [0, 1] (the reference's range), got {s!r}")
    return [float(s) for s in scales]


def _check_alike(registry: Registry, parent: str, infos: Sequence[VersionInfo],
                 tensors: dict[str, torch.Tensor]) -> set[str]:
    """The biases the edits add (the same in each), after checking that no edit removes a tensor, adds
    anything but biases, or changes the parent's files differently from the first edit."""
    added: set[str] | None = None
    files: dict[str, str] | None = None
    for info in infos:
        manifest = registry.manifest(info.ref)
        names = {name for kind, name in manifest if kind == "tensor"}
        removed, extra = sorted(set(tensors) - names), sorted(names - set(tensors))
        if removed or any(not name.endswith(".bias") for name in extra):
            changed = removed or [name for name in extra if not name.endswith(".bias")]
            raise BadInput(f"{info.ref} adds or removes tensors of {parent} ({changed[:3]}); only weight edits "
                           "and added biases compose")
        own_files = {name: blob.sha256 for (kind, name), blob in manifest.items() if kind == "file"}
        if added is None or files is None:
            added, files = set(extra), own_files
        elif set(extra) != added or own_files != files:
            raise BadInput(f"{info.ref} and {infos[0].ref} add different biases or change {parent}'s files "
                           "differently, so their composition would not load as one model")
    return added or set()


def _factored_sums(registry: Registry, parent: str, refs: Sequence[str], scales: Sequence[float]) -> dict[str, LowRank]:
    """The composed change over the first edit's tensor, as factors, of each tensor that every edit changing
    it stores as factors over the parent's tensor (in one layout)."""
    base = registry.manifest(parent)
    manifests = [registry.manifest(ref) for ref in refs]
    with registry.db.read() as session:
        rows = factor_rows(session, [b.sha256 for m in manifests for b in m.values() if b.kind == FACTORED])
    sums: dict[str, LowRank] = {}
    dense: set[str] = set()
    for k, (manifest, s) in enumerate(zip(manifests, scales, strict=True)):
        coefficient = s - 1 if k == 0 else s  # the first edit's own change is already in its tensor
        for (kind, name), blob in manifest.items():
            under = base.get((kind, name))
            if kind != "tensor" or under is None or blob.sha256 == under.sha256:
                continue
            row = rows.get(blob.sha256)
            if row is None or row.base != under.sha256:
                dense.add(name)
                continue
            B, A = (registry.blobs.get_tensor(sha) for sha in (row.b, row.a))
            change = LowRank(B, A, row.scale * coefficient)
            if name in sums and sums[name].B.shape[0] != change.B.shape[0]:
                dense.add(name)
            elif coefficient:
                sums[name] = sums[name].cat(change) if name in sums else change
    return {name: change for name, change in sums.items() if name not in dense}


def compose(
    registry: Registry, refs: Sequence[str], name: str | None = None, scales: Sequence[float] | None = None
) -> VersionInfo:
    """Register W_orig + sum_k s_k (W_k - W_orig) for the versions `refs` (at least two, one parent).

    The new version goes to model `name` (created if new), or to the first ref's model. Only tensors
    that some edit changed are written. A tensor an edit removes, or adds unless it is a bias (a missing
    bias adds zero), is refused, since a delta of a tensor that one side lacks has no meaning.
    """
    started = time.perf_counter()
    if len(refs) < 2:
        raise BadInput(f"compose takes at least two versions, got {len(refs)}")
    infos = [registry.info(ref) for ref in refs]
    resolved = [i.ref for i in infos]
    if len(set(resolved)) != len(resolved):
        raise BadInput(f"compose got the same version twice: {', '.join(resolved)}")
    factors = _check_scales(scales, len(infos))
    if not any(factors):
        raise BadInput("every scale is 0, so the composition is the parent itself; nothing registered")
    parent = _shared_parent(infos)
    base = registry.load_tensors(parent)
    added = _check_alike(registry, parent, infos, base)
    composed: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    changed_by: dict[str, list[str]] = {}
    for info, s in zip(infos, factors, strict=True):
        tensors = registry.load_tensors(info.ref)
        for tensor_name, value in tensors.items():
            W_orig = torch.zeros_like(value) if tensor_name in added else base[tensor_name]
            if torch.equal(value, W_orig):
                continue
            if value.shape != W_orig.shape or not value.is_floating_point():
                raise BadInput(f"{info.ref} changes the shape or dtype of {tensor_name}; only weight edits compose")
            delta = (value.double() - W_orig.double()) * s
            composed[tensor_name] = composed.get(tensor_name, W_orig.double()) + delta
            dtypes[tensor_name] = W_orig.dtype
            changed_by.setdefault(tensor_name, []).append(info.ref)
    changed: dict[str, torch.Tensor | LowRank] = {k: v.to(dtypes[k]).contiguous() for k, v in composed.items()}
    changed.update(_factored_sums(registry, parent, resolved, factors))
    params = {"refs": resolved, "scales": factors, "parent": parent}
    metrics = {"tensors": len(changed), "changed_by": changed_by}
    return registry.commit(
        resolved[0], changed, METHOD, params, metrics, name=name, relation=RELATION,
        other_parents=resolved[1:], duration_s=time.perf_counter() - started,
    )
