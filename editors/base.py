"""The editor plugin interface: a loaded version and a typed request in, changed tensors and metrics out.

Editors never write to the registry. `modelzoo.editors.apply.apply_edit` loads the parent, runs the
editor, and commits what it returns as a child version in one transaction, so an editor that fails or
is interrupted leaves nothing behind. Editors are registered under the entry-point group
`modelzoo.editors` (name -> class), so a third party can add one without touching this repository.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from modelzoo.registry.derived import DerivedTensors, DerivedValue
from modelzoo.registry.errors import BadInput
from modelzoo.registry.factors import LowRank
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.records import VersionInfo

EditProgress = Callable[[int, int, dict[str, float]], None]
"""Called after every optimisation step with (steps done, total steps, figures such as {"loss": ...})."""


@dataclass
class EditResult:
    """What an edit produced. `changed` maps registry tensor names to their new values (only those that
    differ from the parent); `params` is every setting the edit used, defaults included, so the
    provenance alone can reproduce it; `metrics` holds what the editor measured; `derived` are values
    for the registry's derived tensors that depend on the child, stored only after it is committed."""

    changed: dict[str, torch.Tensor]
    params: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    derived: list[DerivedValue] = field(default_factory=list)
    # The low-rank form of changes (scale * B @ A over the parent's stored tensor), for those that have
    # one: the registry stores these as factors in place of the dense values in `changed`.
    factors: dict[str, LowRank] = field(default_factory=dict)


@dataclass(frozen=True)
class EditContext:
    """Where an edit runs: the parent version and the registry's derived tensors, for what outlives one
    edit (MEMIT's covariance statistics); see `Editor`."""

    parent: VersionInfo
    derived: DerivedTensors


@runtime_checkable
class Editor(Protocol):
    """An editor plugin. Besides what is declared here it may define `with_context(request, context)`, which
    returns the request completed from an `EditContext` (`apply_edit` calls it before `edit`); its request
    type follows the protocol of `modelzoo.editors.requests`."""

    name: ClassVar[str]  # the provenance method, e.g. "uce"
    families: ClassVar[tuple[str, ...]]  # the model families it can edit
    request_type: ClassVar[type]  # the request dataclass, which the CLI builds from options and files

    def edit(self, model: LoadedModel, request: Any, progress: EditProgress | None = None) -> EditResult:
        """Validate `request` (raising BadInput before any heavy work), edit, and return the changes.
        The model may be modified in place; the caller discards it."""
        ...


def editor_names() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="modelzoo.editors"))


def get_editor(name: str) -> Editor:
    found = [ep for ep in entry_points(group="modelzoo.editors") if ep.name == name]
    if not found:
        raise BadInput(f"unknown editor {name!r}; installed: {', '.join(editor_names())}")
    editor: Editor = found[0].load()()
    return editor


def changed_tensors(
    model: LoadedModel, names: list[str], before: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The current values of `names` that differ from `before` (copies taken before the edit)."""
    now = {n: model.tensor(n) for n in names}
    return {n: t.detach().clone().contiguous() for n, t in now.items() if not torch.equal(t, before[n])}
