"""Run an editor on a registered version and commit its result as a child version with provenance."""

from __future__ import annotations

import time
from typing import Any

from modelzoo.editors.base import EditContext, EditProgress, get_editor
from modelzoo.editors.requests import request_json, validated
from modelzoo.registry.derived import DerivedTensors
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import get_family
from modelzoo.registry.placement import load_model, resolve_dtype
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.store import Registry


def apply_edit(
    registry: Registry,
    ref: str,
    method: str,
    request: Any,
    *,
    name: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    progress: EditProgress | None = None,
) -> VersionInfo:
    """Edit `ref` with the editor registered as `method` and register the result.

    The child goes to the parent's model, or to model `name` (created if new). Ctrl-C during the edit
    raises KeyboardInterrupt before anything is committed, so it registers nothing.
    """
    editor = get_editor(method)
    request = validated(request)
    info = registry.info(ref)
    if info.family not in editor.families:
        raise BadInput(f"{info.ref} is a {info.family} model; {method} edits {' or '.join(editor.families)} models")
    derived = DerivedTensors(registry)
    with_context = getattr(editor, "with_context", None)
    if with_context is not None:
        request = with_context(request, EditContext(info, derived))
    family = get_family(info.family)
    model = load_model(registry, info.ref, device)
    stored = {n: t.dtype for n, t in model.named_tensors().items()}
    cast = resolve_dtype(dtype)
    if cast is not None:
        model.to(dtype=cast)
    started = time.perf_counter()
    result = editor.edit(model, request, progress)
    duration = time.perf_counter() - started
    # the child keeps the parent's dtypes, whatever the edit ran in, and the registry stores from the CPU
    dense = {n: t.detach().to("cpu", stored.get(n, t.dtype)) for n, t in result.changed.items()}
    changes = {**dense, **result.factors}
    outside = sorted(set(changes) - set(family.editable_tensors(model)))
    if outside:  # a plugin's bug must not become a version that, say, rewrote the tokenizer's embeddings
        raise BadInput(f"{method} changed tensors that {info.family} models do not let editors change "
                       f"({', '.join(outside[:3])}); nothing registered")
    params = {"request": request_json(request), **result.params}
    metrics = {**result.metrics, "edit_seconds": round(duration, 3)}
    child = registry.commit(
        info.ref, changes, method, params, metrics, name=name, relation="edit", duration_s=duration
    )
    for value in result.derived:
        derived.put(value.kind, value.key, value.tensor, value.meta, depends_on=child.manifest_hash)
    return child
