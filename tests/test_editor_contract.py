"""What `apply_edit` holds every editor to, whoever wrote it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import modelzoo
from modelzoo.editors import apply
from modelzoo.editors.base import EditResult
from modelzoo.registry.errors import BadInput


@dataclass
class ScaleOne:
    """An editor that doubles one named tensor, as a third-party plugin might."""

    tensor: str
    name: str = "scale-one"
    families: tuple[str, ...] = ("lm",)

    def edit(self, model, request, progress=None):  # type: ignore[no-untyped-def]
        return EditResult({self.tensor: model.tensor(self.tensor) * 2}, {"tensor": self.tensor})


def _edit_with(monkeypatch: pytest.MonkeyPatch, zoo: modelzoo.Zoo, ref: str, tensor: str):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(apply, "get_editor", lambda name: ScaleOne(tensor))
    return apply.apply_edit(zoo.registry, ref, "scale-one", {})


def test_an_editor_may_change_what_its_family_calls_editable(monkeypatch, zoo, gpt2_dir):
    parent = zoo.import_(gpt2_dir, "gpt2")
    child = _edit_with(monkeypatch, zoo, parent.ref, "transformer.h.0.mlp.c_proj.weight")
    assert [c.tensor for c in zoo.diff(parent.ref, child.ref).changed] == ["transformer.h.0.mlp.c_proj.weight"]


@pytest.mark.parametrize("tensor", ["transformer.wte.weight", "transformer.ln_f.weight"])
def test_an_editor_that_changes_other_tensors_registers_nothing(monkeypatch, zoo, gpt2_dir, tensor):
    parent = zoo.import_(gpt2_dir, "gpt2")
    with pytest.raises(BadInput, match="do not let editors change"):
        _edit_with(monkeypatch, zoo, parent.ref, tensor)
    assert [v.ref for v in zoo.versions("gpt2")] == ["gpt2@1"]
