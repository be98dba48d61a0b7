"""UCE: the closed form on a tiny random pipeline, registered children, bad input, and its measured effect
on the shapes world (erasing a colour, debiasing a shape prompt over two colours)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from tiny_models import tiny_sd_pipeline

import modelzoo
from modelzoo.editors.base import get_editor
from modelzoo.editors.diffusion_text import text_side
from modelzoo.editors.uce import UceEditor, UceRequest
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow")
SHAPE_TEMPLATES = tuple(f"a {{}} {shape}" for shape in SHAPES)
"""The shapes world's captions put the colour before the shape; its text encoder never saw a bare colour."""


def loaded(pipe) -> LoadedModel:  # type: ignore[no-untyped-def]
    return LoadedModel(ref="tiny@1", family="diffusion", pipeline=pipe,
                       modules={"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tokenizer=pipe.tokenizer)


def projections(pipe) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules()
            if n.endswith(("attn2.to_k", "attn2.to_v"))}


def last_token_embedding(pipe, text: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    side = text_side(loaded(pipe))
    return side.encode([text])[0, len(side.token_ids(text, "text", allow_empty=True))]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_erase_maps_each_concept_to_its_target_values_when_lam_is_tiny() -> None:
    pipe = tiny_sd_pipeline()
    before = projections(pipe)
    erase, targets = ("cat", "dog", "house"), ("", "bird", "tree")
    UceEditor().edit(loaded(pipe), UceRequest(erase=erase, targets=targets, tokens="last", lam=1e-4))
    after = projections(pipe)
    for concept, target in zip(erase, targets, strict=True):
        c, g = last_token_embedding(pipe, concept), last_token_embedding(pipe, target)
        for name in before:
            assert relative(after[name] @ c, before[name] @ g) < 0.01, (concept, name)


def test_preserved_concepts_keep_their_projected_outputs() -> None:
    pipe = tiny_sd_pipeline()
    before = projections(pipe)
    preserve = ("bird", "tree", "car")
    UceEditor().edit(loaded(pipe), UceRequest(erase=("cat", "dog"), preserve=preserve, tokens="last", lam=1e-4))
    after = projections(pipe)
    changed = 0.0
    for concept in preserve:
        c = last_token_embedding(pipe, concept)
        for name in before:
            assert relative(after[name] @ c, before[name] @ c) < 0.01, (concept, name)
        changed = max(changed, max(relative(after[n], before[n]) for n in before))
    assert changed > 0.01  # the edit did move the weights


def test_only_the_selected_projections_differ_from_the_parent() -> None:
    pipe = tiny_sd_pipeline()
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = UceEditor().edit(loaded(pipe), UceRequest(erase=("cat",), projections=("to_v",), layers=("up_blocks",)))
    differing = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, state[k])}
    assert differing == {k.removeprefix("unet/") for k in result.changed}
    assert differing and all("up_blocks" in k and k.endswith("attn2.to_v.weight") for k in differing)


def test_a_hundred_concepts_take_one_linear_solve(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    solve = torch.linalg.solve

    def counting(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(A.shape))
        return solve(A, B)

    monkeypatch.setattr(torch.linalg, "solve", counting)
    pipe = tiny_sd_pipeline()
    concepts = tuple(f"thing {i}" for i in range(100))
    result = UceEditor().edit(loaded(pipe), UceRequest(erase=concepts, tokens="last"))
    assert calls == [(16, 16)]  # one d x d solve for every edited projection
    assert result.metrics["concept_rows"]["edited"] == 100


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (UceRequest(erase=("",)), "tokenizes to nothing"),
        (UceRequest(erase=("cat " * 80,)), "tokens"),
        (UceRequest(erase=("cat",), preserve=("cat",)), "both edited and preserved"),
        (UceRequest(erase=("cat",), targets=("cat",)), "its own target"),
        (UceRequest(erase=("cat", "dog"), targets=("a", "b", "c")), "targets"),
        (UceRequest(mode="moderate", erase=("cat",), targets=("dog",)), "empty prompt"),
        (UceRequest(mode="debias", debias=("a doctor",), attributes=("man",)), "two or more"),
        (UceRequest(erase=("cat",), attributes=("red", "blue")), "debias mode"),
        (UceRequest(erase=("cat",), lam=0), "lam"),
        (UceRequest(erase=("cat",), templates=("a circle",)), "template"),
        (UceRequest(erase=("cat",), tokens="first"), "token choice"),  # type: ignore[arg-type]
    ],
)
def test_bad_requests_are_refused_before_any_weight_changes(request_: UceRequest, message: str) -> None:
    pipe = tiny_sd_pipeline()
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(BadInput, match=message):
        UceEditor().edit(loaded(pipe), request_)
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())


def test_child_version_stores_only_changed_tensors_and_exports_as_a_pipeline(
    zoo: modelzoo.Zoo, sd_dir: Path, tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    parent = zoo.import_(sd_dir, "sd")
    child = zoo.edit(parent.ref, "uce", UceRequest(erase=("cat", "dog"), preserve=("bird",)), name="sd-uce")
    diff = zoo.diff(parent.ref, child.ref)
    changed = {c.tensor for c in diff.changed}
    assert changed and all(n.startswith("unet/") and n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))
                           for n in changed)
    assert child.method == "uce" and child.parents[0].ref == parent.ref
    assert child.params["request"]["erase"] == ["cat", "dog"] and child.params["lam"] == 0.5
    assert child.metrics["edited_tensors"] == len(changed) and "edit_seconds" in child.metrics
    assert child.package_version and child.duration_s > 0
    assert 0 < child.added_bytes < 0.25 * parent.logical_bytes  # only the projections are new
    pipe = DiffusionPipeline.from_pretrained(zoo.export(child.ref, tmp_path / "out"))
    edited = dict(pipe.unet.named_parameters())
    for name in changed:
        assert torch.equal(edited[name.removeprefix("unet/")], zoo.tensors(child.ref, [name])[name])
    images = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_cli_erases_and_prints_the_child(capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    result = zoo_cli(capsys, home, "edit", "uce", "sd", "--erase", "cat", "--template", "a photo of {}",
                     "--preserve", "dog", "--json")
    assert result.code == 0, result.err
    child = json.loads(result.out)
    assert child["ref"] == "sd@2" and child["method"] == "uce"
    assert child["params"]["request"]["templates"] == ["a photo of {}"]


@pytest.mark.parametrize(
    "args",
    [
        ["--erase", ""],
        ["--erase", "cat " * 80],
        ["--erase", "cat", "--preserve", "cat"],
        ["--debias", "a doctor", "--attribute", "man"],
        ["--erase", "cat", "--request", "missing.json"],
    ],
)
def test_cli_bad_input_exits_2_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path, args: list[str]
) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "edit", "uce", "sd", *args)
    assert result.code == 2 and result.err.startswith("error: ") and len(result.err.strip().splitlines()) == 1
    assert snapshot(home) == before


def test_a_non_diffusion_version_is_refused(capsys: pytest.CaptureFixture[str], home: Path, gpt2_dir: Path) -> None:
    assert zoo_cli(capsys, home, "import", str(gpt2_dir), "--name", "lm").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "edit", "uce", "lm", "--erase", "cat")
    assert result.code == 2 and "lm model" in result.err
    assert snapshot(home) == before


def test_the_plugin_is_found_by_its_entry_point() -> None:
    assert isinstance(get_editor("uce"), UceEditor)


# ---- the shapes world -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shapes_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick shapes-world diffusion model, trained once per test session (about 30 s on one thread)."""
    return quick_shapes_pipeline(tmp_path_factory, seed=0)


def quick_shapes_pipeline(tmp_path_factory: pytest.TempPathFactory, seed: int) -> Path:
    """The quick shapes-world diffusion model trained with `seed`, saved once per test session."""
    from modelzoo.demo.train_diffusion import PROFILES, train_pipeline

    out = tmp_path_factory.getbasetemp() / f"shapes-quick-sd-{seed}"
    if not (out / "model_index.json").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pipe, _ = train_pipeline(PROFILES["quick"], seed=seed)
        finally:
            torch.set_num_threads(threads)
        pipe.save_pretrained(out)
    return out


def shapes_model(directory: Path) -> LoadedModel:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(directory)
    pipe.set_progress_bar_config(disable=True)
    return loaded(pipe)


def colour_share(model: LoadedModel, prompt: str, colour: str, n: int = 32, seed: int = 123) -> float:
    """Share of default-settings samples of `prompt` that the meter reads as `colour`."""
    from modelzoo.demo.meters import colours_of

    with torch.no_grad():
        images = model.pipeline(prompt, num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed),
                                output_type="np").images
    return float(np.mean([c == colour for c in colours_of((images * 255).round().clip(0, 255).astype(np.uint8))]))


@pytest.fixture(scope="session")
def parent_shares(shapes_pipeline_dir: Path) -> dict[str, float]:
    """How often the unedited model draws "a <colour> circle" in that colour, measured once."""
    parent = shapes_model(shapes_pipeline_dir)
    return {c: colour_share(parent, f"a {c} circle", c) for c in COLOURS}


def efficacy_and_specificity(
    child: LoadedModel, erased: str, before: dict[str, float]
) -> tuple[float, dict[str, float]]:
    """(fall of the erased colour's share as a fraction of its original, other colours' kept agreement)."""
    after = {c: colour_share(child, f"a {c} circle", c) for c in COLOURS}
    kept = {c: after[c] / before[c] for c in COLOURS if c != erased}
    return (before[erased] - after[erased]) / before[erased], kept


def test_erasing_a_colour_towards_the_empty_prompt_removes_it_and_keeps_the_others(
    shapes_pipeline_dir: Path, parent_shares: dict[str, float]
) -> None:
    # The quick model draws "a circle" (no colour) red, so erasing red towards "" leaves red: blue it is.
    child = shapes_model(shapes_pipeline_dir)
    others = tuple(c for c in COLOURS if c != "blue")
    UceEditor().edit(child, UceRequest(erase=("blue",), preserve=others, templates=SHAPE_TEMPLATES))
    fall, kept = efficacy_and_specificity(child, "blue", parent_shares)
    assert fall >= 0.7, fall
    assert min(kept.values()) >= 0.9, kept


def test_erasing_red_towards_another_colour_removes_it_and_keeps_the_others(
    shapes_pipeline_dir: Path, parent_shares: dict[str, float]
) -> None:
    child = shapes_model(shapes_pipeline_dir)
    others = ("green", "blue", "yellow")
    UceEditor().edit(child, UceRequest(erase=("red",), targets=("green",), preserve=others, templates=SHAPE_TEMPLATES))
    fall, kept = efficacy_and_specificity(child, "red", parent_shares)
    assert fall >= 0.7, fall
    assert min(kept.values()) >= 0.9, kept


@pytest.mark.slow
def test_debiasing_a_shape_prompt_over_two_colours_approaches_half_and_half(shapes_pipeline_dir: Path) -> None:
    """The quick model draws "a circle" red every time. Its colour moves continuously with the text
    conditioning (red -> yellow -> green -> blue), so red/blue has no 50/50 point (the midway images are
    green); red/yellow, neighbours in hue, does. Measured: the loop stopped after 7 iterations at 49/51 on
    its 64 seeds; 200 held-out samples read 58% red among those read as red or yellow (21% read as
    neither), and every colour prompt kept 100% agreement."""
    from modelzoo.cli.demo import meter_reader
    from modelzoo.demo.meters import colours_of

    model = shapes_model(shapes_pipeline_dir)
    keep = tuple(f"a {c} {s}" for c in COLOURS for s in ("circle", "square"))
    request = UceRequest(mode="debias", debias=("a circle",), attributes=("red", "yellow"),
                         templates=("a {} circle",), preserve=keep, samples_per_prompt=64, reader="meter",
                         read=meter_reader)
    result = UceEditor().edit(model, request)
    with torch.no_grad():
        images = model.pipeline("a circle", num_images_per_prompt=200, generator=torch.Generator().manual_seed(9),
                                output_type="np").images
    read = colours_of((images * 255).round().clip(0, 255).astype(np.uint8), ("red", "yellow"))
    red, yellow = read.count("red"), read.count("yellow")
    assert abs(red / (red + yellow) - 0.5) <= 0.1, (red, yellow, result.metrics)


@pytest.mark.parametrize("content, message", [
    (None, "no UCE request file"),
    ("{broken", "cannot read the UCE request"),
    ("[1, 2]", "a UCE request is a JSON object, not list"),
    ('{"erase": ["cat"], "earse": ["dog"]}', "unknown keys ['earse']"),
    ('{"mode": "debias", "debias": ["a cat"], "attributes": ["red", "blue"], "read": "meter"}',
     "unknown keys ['read']"),  # the reader handle is not a setting
])
def test_cli_request_file_errors_are_one_line_and_register_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path, tmp_path: Path, content: str | None, message: str
) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    path = tmp_path / "request.json"
    if content is not None:
        path.write_text(content)
    before = snapshot(home)
    result = zoo_cli(capsys, home, "edit", "uce", "sd", "--request", str(path))
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert snapshot(home) == before
