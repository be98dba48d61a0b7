"""ESD: parameter subsets, the training loop's contract (progress, interruption), registered children,
bad input, and its measured effect on the shapes world."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from test_editor_uce import (
    COLOURS,
    SHAPE_TEMPLATES,
    colour_share,
    efficacy_and_specificity,
    loaded,
    quick_shapes_pipeline,
    shapes_model,
)
from tiny_models import tiny_sd_pipeline

import modelzoo
from modelzoo.cli.demo import meter_reader
from modelzoo.editors.diffusion_text import text_side
from modelzoo.editors.esd import TRAIN_METHODS, EsdEditor, EsdRequest, Pull, _sample_until, trainable
from modelzoo.registry.errors import BadInput

FAST = {"iterations": 3, "ddim_steps": 4, "lr": 1e-3}
ERASE_A_COLOUR = {"templates": SHAPE_TEMPLATES, "train_method": "noxattn", "lr": 3e-5, "iterations": 1200,
                  "read_until": 0.1, "read_every": 50}
"""Chosen on quick models trained with seeds 3-6, edit seed 10, squares and triangles (editors/esd.py has
the figures): trained until the colour meter reads red in at most a tenth of the images drawn for it; the
test below uses seeds 0-2 and circles."""


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


def test_the_frozen_sampler_draws_each_x_t_as_drawing_it_alone_would() -> None:
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipeline()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(6)
    texts = text_side(loaded(pipe)).encode(["", "a cat", "a dog", "a bird"])
    x = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    stops = torch.tensor([2, 5, 0])
    together, t = _sample_until(pipe.unet, scheduler, x, texts[1:], texts[:1], 3.0, stops)
    for i in range(3):
        alone, t_alone = _sample_until(pipe.unet, scheduler, x[i : i + 1], texts[1 + i : 2 + i], texts[:1], 3.0,
                                       stops[i : i + 1])
        assert torch.allclose(together[i], alone[0], atol=1e-5), i
        assert t[i] == t_alone[0] == scheduler.timesteps[stops[i]]
    assert torch.equal(together[2], x[2]) and not torch.allclose(together[0], x[0])


def test_a_templated_concept_is_guided_away_from_the_empty_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first step's loss is |eps(x_t, c) - [eps_0 - eta (eps(x_t, c) - eps_0)]|^2 with c = "a cat circle",
    the template filled, and eps_0 the prediction for the empty prompt (not for "a circle")."""
    import modelzoo.editors.esd as esd

    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        drawn.append(_sample_until(*args))
        return drawn[-1]

    monkeypatch.setattr(esd, "_sample_until", recording)
    pipe = tiny_sd_pipeline()
    original = copy.deepcopy(pipe.unet)
    result = EsdEditor().edit(loaded(pipe), EsdRequest(erase=("cat",), templates=("a {} circle",), iterations=1,
                                                       ddim_steps=4, batch_size=2))
    held_out, (x, t) = drawn  # the pull's held-out x_t are drawn first, then the one training step's
    assert not torch.equal(held_out[0][:2], x)
    texts = text_side(loaded(pipe)).encode(["a cat circle", "", "a circle", "cat"])

    def first_loss(prompt: int, absent: int) -> float:
        with torch.no_grad():
            e_p, e_0 = (original(x, t, encoder_hidden_states=texts[i][None].expand(2, -1, -1)).sample
                        for i in (prompt, absent))
        return float(torch.nn.functional.mse_loss(e_p, e_0 - (e_p - e_0)))

    assert result.metrics["first_loss"] == pytest.approx(first_loss(0, 1), rel=1e-4)
    for wrong in (first_loss(0, 2), first_loss(3, 1)):
        assert wrong != pytest.approx(first_loss(0, 1), rel=1e-2)


def test_the_pull_is_one_before_the_edit_zero_without_the_concept_and_minus_one_when_guided_away() -> None:
    pipe = tiny_sd_pipeline()
    texts = text_side(loaded(pipe)).encode(["", "a cat"])
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn((3, 4, 8, 8), generator=generator), torch.tensor([900, 500, 100])
    pull = Pull(pipe.unet, x, t, texts[1:].expand(3, -1, -1), texts[:1])

    class Rewired(torch.nn.Module):
        """The original with eps'(x_t, c) = eps(x_t) + k [eps(x_t, c) - eps(x_t)] for every c but the empty one."""

        def __init__(self, k: float):
            super().__init__()
            self.k = k

        def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
            out = pipe.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample
            e_0 = pipe.unet(x, t, encoder_hidden_states=texts[:1].expand_as(encoder_hidden_states)).sample
            is_empty = (encoder_hidden_states == texts[:1]).flatten(1).all(1)[:, None, None, None]
            return type("Out", (), {"sample": torch.where(is_empty, out, e_0 + self.k * (out - e_0))})

    assert pull(pipe.unet) == pytest.approx(1.0, abs=1e-5)
    for k in (0.0, -1.0, 0.5):
        assert pull(Rewired(k)) == pytest.approx(k, abs=1e-5)


def test_training_stops_once_the_pull_falls_to_until() -> None:
    steps = EsdRequest(erase=("cat",), iterations=40, ddim_steps=4, lr=3e-3, check_every=2)
    free = EsdEditor().edit(loaded(tiny_sd_pipeline()), steps)
    assert free.metrics["iterations_run"] == 40 and free.metrics["final_pull"] < 0.9
    pulls: dict[int, float] = {}
    stopped = EsdEditor().edit(loaded(tiny_sd_pipeline()), dataclasses.replace(steps, until=0.9),
                               progress=lambda done, total, f: pulls.update({done: f["pull"]} if "pull" in f else {}))
    run = stopped.metrics["iterations_run"]
    assert run < 40 and run % 2 == 0 and sorted(pulls) == list(range(2, run + 1, 2))
    assert pulls[run] <= 0.9 < min(pulls[i] for i in pulls if i < run)
    assert stopped.metrics["final_pull"] == pytest.approx(pulls[run])


def test_training_stops_once_the_reader_no_longer_sees_the_concept() -> None:
    seen: list[tuple[tuple[int, ...], str, list[str]]] = []

    def reader(images: np.ndarray, attributes: Any) -> list[str | None]:
        seen.append((images.shape, str(images.dtype), list(attributes)))
        still = len(seen) < 3  # the third reading no longer sees a cat in half the images
        return ["cat" if still or i % 2 else "dog" for i in range(len(images))]

    request = EsdRequest(erase=("cat",), preserve=("dog",), templates=("a {}", "a photo of a {}"), iterations=40,
                         ddim_steps=3, lr=1e-4, read_until=0.5, read_every=4, read_images=2, read=reader)
    reads: dict[int, float] = {}
    result = EsdEditor().edit(loaded(tiny_sd_pipeline()), request,
                              progress=lambda done, total, f: reads.update({done: f["read"]} if "read" in f else {}))
    assert result.metrics["iterations_run"] == 12 and reads == {4: 1.0, 8: 1.0, 12: 0.5}
    assert result.metrics["reads"] == list(reads.items())
    assert [s[0][0] for s in seen] == [4, 4, 4] and seen[0][0][3] == 3 and seen[0][1] == "uint8"
    assert all(s[2] == ["cat", "dog"] for s in seen) and "read" not in result.params


def test_progress_reports_every_step_with_its_loss() -> None:
    calls: list[tuple[int, int, dict[str, float]]] = []
    EsdEditor().edit(loaded(tiny_sd_pipeline()), EsdRequest(erase=("cat",), **FAST),
                     progress=lambda *call: calls.append(call))
    assert [(done, total) for done, total, _ in calls] == [(1, 3), (2, 3), (3, 3)]
    assert all(torch.isfinite(torch.tensor(f["loss"])) for _, _, f in calls)


def _reads_nothing(images: np.ndarray, attributes: Any) -> list[str | None]:
    return [None] * len(images)


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
        (EsdRequest(erase=("cat",), until=1.0), "until"),
        (EsdRequest(erase=("cat",), check_every=0), "check_every"),
        (EsdRequest(erase=("cat",), preserve=("dog",), read_until=0.1), "not loaded"),
        (EsdRequest(erase=("cat",), read_until=0.1, read=_reads_nothing), "preserve"),
        (EsdRequest(erase=("cat",), preserve=("dog",), read_until=1.0, read=_reads_nothing), "read_until"),
        (EsdRequest(erase=("cat",), preserve=("dog",), read_until=0.1, read_every=0, read=_reads_nothing),
         "read_every"),
        (EsdRequest(erase=("cat",), templates=("a circle",)), "template"),
        (EsdRequest(erase=("cat",), templates=()), "template"),
        (EsdRequest(erase=("cat",), templates=("{}" + " circle" * 80,)), "in its template"),
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
    result = zoo_cli(capsys, home, "edit", "esd", "sd", "--erase", "cat", "--template", "a {} circle", "--template",
                     "a photo of a {}", "--train-method", "esd-x", "--iterations", "2", "--ddim-steps", "3",
                     "--name", "sd-esd")
    assert result.code == 0, result.err
    assert "sd-esd@1" in result.out
    params = modelzoo.open(home).get("sd-esd@1").params
    assert params["templates"] == ["a {} circle", "a photo of a {}"] and params["train_method"] == "xattn"


def test_cli_reads_the_images_with_the_reader_it_is_given(capsys: pytest.CaptureFixture[str], home: Path,
                                                           sd_dir: Path) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    result = zoo_cli(capsys, home, "edit", "esd", "sd", "--erase", "red", "--preserve", "green", "--iterations", "2",
                     "--ddim-steps", "2", "--read-until", "0.5", "--read-every", "1", "--read-images", "1",
                     "--reader", "meter", "--json")
    assert result.code == 0, result.err
    child = json.loads(result.out)
    assert child["params"]["reader"] == "meter" and child["params"]["read_until"] == 0.5
    assert 1 <= len(child["metrics"]["reads"]) <= 2


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


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2], ids=lambda seed: f"seed{seed}")
def test_erasing_a_colour_removes_it_and_keeps_the_others(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    """The bare concept "red" erased inside the captions the quick model trained with `seed` knows, the edit
    drawn with `seed` too, until the colour meter reads red in at most a tenth of the images drawn for it
    (slow: 3 to 12 minutes a seed on a busy machine). Measured (share of red circles that falls; lowest share
    of another colour kept; 32 circles each; steps run): seed 0 0.91 / 0.97 after 1,200 (the cap: the last
    reading saw red in 14%), seed 1 1.00 / 1.00 after 150, seed 2 0.91 / 1.00 after 150."""
    directory = quick_shapes_pipeline(tmp_path_factory, seed)
    before = {c: colour_share(shapes_model(directory), f"a {c} circle", c) for c in COLOURS}
    child = shapes_model(directory)
    others = tuple(c for c in COLOURS if c != "red")
    result = EsdEditor().edit(child, EsdRequest(erase=("red",), preserve=others, seed=seed, read=meter_reader,
                                                **ERASE_A_COLOUR))
    fall, kept = efficacy_and_specificity(child, "red", before)
    print(json.dumps({"seed": seed, "before": before, "fall": fall, "kept": kept, "reads": result.metrics["reads"]}))
    assert fall >= 0.7, fall
    assert min(kept.values()) >= 0.9, kept
