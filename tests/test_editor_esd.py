"""ESD: parameter subsets, the training loop's contract (progress, interruption), registered children,
bad input, and its measured effect on the shapes world."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from test_editor_uce import (  # noqa: F401  (fixtures shared with the UCE tests: one training per session)
    efficacy_and_specificity,
    loaded,
    parent_shares,
    shapes_model,
    shapes_pipeline_dir,
)
from tiny_models import tiny_sd_pipeline

import modelzoo
from modelzoo.editors.esd import TRAIN_METHODS, EsdEditor, EsdRequest, trainable
from modelzoo.registry.errors import BadInput

FAST = {"iterations": 3, "ddim_steps": 4, "lr": 1e-3}


@pytest.mark.parametrize("method", sorted(TRAIN_METHODS))
def test_each_train_method_changes_exactly_its_parameter_set(method: str) -> None:
    pipe = tiny_sd_pipeline()
    expected = set(trainable(pipe.unet, method))
    result = EsdEditor().edit(loaded(pipe), EsdRequest(erase=("cat",), train_method=method, **FAST))
    changed = {name.removeprefix("unet/") for name in result.changed}
    assert changed and changed <= expected
    assert len(changed) >= 0.9 * len(expected)  # Adam moves every parameter with a gradient


def test_parameter_sets_follow_the_reference_names() -> None:
    unet = tiny_sd_pipeline().unet
    xattn, noxattn, strict = (set(trainable(unet, m)) for m in ("xattn", "noxattn", "strict"))
    assert all("attn2." in n for n in xattn) and not any("attn2." in n for n in noxattn)
    assert xattn | noxattn | {n for n, _ in unet.named_parameters() if n.startswith(("time_embedding.", "conv_out."))
                               or n.startswith("conv_norm_out.")} == {n for n, _ in unet.named_parameters()}
    assert strict and strict < xattn and all(".to_k." in n or ".to_v." in n for n in strict)


def test_progress_reports_every_step_with_its_loss() -> None:
    calls: list[tuple[int, int, dict[str, float]]] = []
    EsdEditor().edit(loaded(tiny_sd_pipeline()), EsdRequest(erase=("cat",), **FAST),
                     progress=lambda *call: calls.append(call))
    assert [(done, total) for done, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert all(torch.isfinite(torch.tensor(f["loss"])) for _, _, f in calls)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (EsdRequest(erase=("",)), "tokenizes to nothing"),
        (EsdRequest(erase=("cat " * 80,)), "tokens"),
        (EsdRequest(), "concept to erase"),
        (EsdRequest(erase=("cat",), train_method="everything"), "train method"),
        (EsdRequest(erase=("cat",), iterations=0), "iterations"),
        (EsdRequest(erase=("cat",), lr=-1), "lr"),
        (EsdRequest(erase=("cat",), sampler="other"), "sampler"),  # type: ignore[arg-type]
    ],
)
def test_bad_requests_are_refused(request_: EsdRequest, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        EsdEditor().edit(loaded(tiny_sd_pipeline()), request_)


def test_child_version_stores_only_changed_tensors_and_exports_as_a_pipeline(
    zoo: modelzoo.Zoo, sd_dir: Path, tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    parent = zoo.import_(sd_dir, "sd")
    child = zoo.edit(parent.ref, "esd", EsdRequest(erase=("cat",), train_method="strict", **FAST))
    changed = {c.tensor for c in zoo.diff(parent.ref, child.ref).changed}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed)
    assert child.method == "esd" and child.params["eta"] == 1.0 and child.params["train_method"] == "strict"
    assert child.metrics["changed_tensors"] == len(changed) and "final_loss" in child.metrics
    pipe = DiffusionPipeline.from_pretrained(zoo.export(child.ref, tmp_path / "out"))
    images = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_cli_trains_and_registers(capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    result = zoo_cli(capsys, home, "edit", "esd", "sd", "--erase", "cat", "--train-method", "esd-x",
                     "--iterations", "2", "--ddim-steps", "3", "--name", "sd-esd")
    assert result.code == 0, result.err
    assert "sd-esd@1" in result.out


@pytest.mark.parametrize(
    "args",
    [["--erase", ""], ["--erase", "cat", "--train-method", "everything"], ["--erase", "cat", "--iterations", "0"]],
)
def test_cli_bad_input_exits_2_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path, args: list[str]
) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "edit", "esd", "sd", *args)
    assert result.code == 2 and result.err.startswith("error: ")
    assert snapshot(home) == before


def test_interrupted_training_exits_130_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    before = snapshot(home)
    steps = 0
    step = torch.optim.Adam.step

    def interrupted(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        nonlocal steps
        steps += 1
        if steps == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupted)
    result = zoo_cli(capsys, home, "edit", "esd", "sd", "--erase", "cat", "--iterations", "5", "--ddim-steps", "3")
    assert result.code == 130 and result.err == "interrupted: nothing was registered\n"
    assert snapshot(home) == before


def test_erasing_a_colour_removes_it_and_keeps_the_others(
    shapes_pipeline_dir: Path, parent_shares: dict[str, float]  # noqa: F811
) -> None:
    """ESD-x with the shapes world's red prompts as the erased concepts (the text encoder never saw a bare
    colour). Measured: red 100% -> 0%, every other colour kept at 100% (32 samples each)."""
    child = shapes_model(shapes_pipeline_dir)
    request = EsdRequest(erase=tuple(f"a red {s}" for s in ("circle", "square", "triangle", "star")),
                         train_method="xattn", lr=3e-4, iterations=100)
    EsdEditor().edit(child, request)
    fall, kept = efficacy_and_specificity(child, "red", parent_shares)
    assert fall >= 0.7, fall
    assert min(kept.values()) >= 0.9, kept
