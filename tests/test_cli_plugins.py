"""An editor from another package gets `zoo edit NAME` with no code in cli/: found through its
distribution's entry point, its request built from `-o key=value` and `--request FILE.json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from modelzoo.cli.edit._plugins import fields_help, parse_options
from modelzoo.registry.errors import BadInput

PLUGIN = '''
from dataclasses import dataclass

from modelzoo.editors.base import EditResult


@dataclass(frozen=True)
class ScaleRequest:
    tensor: str
    factor: float = 0.5


class ScaleEditor:
    name = "scale"
    families = ("lm", "diffusion", "gan")
    request_type = ScaleRequest

    def edit(self, model, request, progress=None):
        return EditResult(changed={request.tensor: model.tensor(request.tensor) * request.factor}, params={})
'''


def _install_plugin(site: Path) -> None:
    """The files pip would install for a package declaring `scale = scale_plugin:ScaleEditor`."""
    (site / "scale_plugin.py").write_text(PLUGIN)
    info = site / "scale_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scale-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modelzoo.editors]\nscale = scale_plugin:ScaleEditor\n")


def _zoo(site: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "from modelzoo.cli.main import run; run()", "--home", str(home), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_an_installed_plugin_editor_registers_a_child_from_the_cli(tmp_path, gpt2_dir):
    import modelzoo

    site = tmp_path / "site"
    site.mkdir()
    _install_plugin(site)
    home = tmp_path / "zoo"
    parent = modelzoo.open(home).import_(gpt2_dir, "gpt2")
    tensor = "transformer.h.0.mlp.c_fc.weight"

    done = _zoo(site, home, "edit", "scale", parent.ref, "-o", f"tensor={tensor}", "-o", "factor=0.25", "--json")
    assert done.returncode == 0, done.stderr
    child = json.loads(done.stdout)
    assert child["method"] == "scale" and child["params"]["request"] == {"tensor": tensor, "factor": 0.25}
    zoo = modelzoo.open(home)
    assert torch.equal(zoo.tensors(child["ref"])[tensor], zoo.tensors(parent.ref)[tensor] * 0.25)
    assert [c.tensor for c in zoo.diff(parent.ref, child["ref"]).changed] == [tensor]

    shown = _zoo(site, home, "edit", "scale", "--help")
    assert shown.returncode == 0 and "tensor (str; default 'required')" in shown.stdout
    assert "factor (float; default 0.5)" in shown.stdout

    refused = _zoo(site, home, "edit", "scale", parent.ref, "-o", "factor=big")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "factor" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert [v.ref for v in modelzoo.open(home).versions("gpt2")] == ["gpt2@1", child["ref"]]


@dataclass(frozen=True)
class _Request:
    name: str
    steps: int = 3
    """How many steps
    to take."""
    lr: float = 0.1
    enabled: bool = False
    words: tuple[str, ...] = ()
    sizes: list[int] = field(default_factory=list)
    mode: Literal["a", "b"] = "a"
    limit: float | None = None
    handle: object = field(default=None, metadata={"provenance": False})


def test_options_take_the_type_of_the_field_they_set():
    parsed = parse_options(_Request, ["name=x", "steps=7", "lr=1e-3", "enabled=true", "words=a", "words=b c",
                                      "sizes=[1, 2]", "sizes=3", "mode=b", "limit=none"])
    assert parsed == {"name": "x", "steps": 7, "lr": 1e-3, "enabled": True, "words": ["a", "b c"],
                      "sizes": [1, 2, 3], "mode": "b", "limit": None}


@pytest.mark.parametrize(("pair", "message"), [
    ("steps=many", "expected int"), ("enabled=maybe", "true or false"), ("mode=c", "one of"),
    ("nosuch=1", "use key=value"), ("handle=x", "use key=value"), ("name", "use key=value"),
    ("sizes=[1", "not valid JSON"),
])
def test_bad_options_are_one_line_errors(pair, message):
    with pytest.raises(BadInput, match=message):
        parse_options(_Request, [pair])


def test_a_single_valued_option_given_twice_is_refused():
    with pytest.raises(BadInput, match="given twice"):
        parse_options(_Request, ["steps=1", "steps=2"])


def test_the_plugin_tested_here_is_the_readme_example_verbatim():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert f"```python\n{PLUGIN.strip()}\n```" in readme


def test_the_help_lists_each_field_with_its_type_default_and_docstring():
    text = fields_help(_Request)
    assert "steps (int; default 3): How many steps to take." in text
    assert "name (str; default 'required')" in text and "handle" not in text
