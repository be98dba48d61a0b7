"""Run an editor on a registered version and commit its result as a child version with provenance."""

from __future__ import annotations

import time
from dataclasses import asdict, is_dataclass
from typing import Any

from modelzoo.editors.base import EditContext, EditProgress, get_editor
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import get_family
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.store import Registry


def _request_json(request: Any) -> Any:
    return asdict(request) if is_dataclass(request) and not isinstance(request, type) else request


def apply_edit(
    registry: Registry,
    ref: str,
    method: str,
    request: Any,
    *,
    name: str | None = None,
    device: str = "cpu",
    progress: EditProgress | None = None,
) -> VersionInfo:
    """Edit `ref` with the editor registered as `method` and register the result.

    The child goes to the parent's model, or to model `name` (created if new). Ctrl-C during the edit
    registers nothing and is reported as bad input, like any other edit that did not finish.
    """
    editor = get_editor(method)
    info = registry.info(ref)
    if info.family not in editor.families:
        raise BadInput(f"{info.ref} is a {info.family} model; {method} edits {' or '.join(editor.families)} models")
    with_context = getattr(editor, "with_context", None)
    if with_context is not None:
        request = with_context(request, EditContext(info, registry.settings.home / "cache"))
    model = get_family(info.family).load(registry, info.ref, device)
    started = time.perf_counter()
    try:
        result = editor.edit(model, request, progress)
    except KeyboardInterrupt:
        raise BadInput(f"{method} edit of {info.ref} interrupted; nothing registered") from None
    duration = time.perf_counter() - started
    params = {"request": _request_json(request), **result.params}
    metrics = {**result.metrics, "edit_seconds": round(duration, 3)}
    return registry.commit(
        info.ref, result.changed, method, params, metrics, name=name, relation="edit", duration_s=duration
    )
