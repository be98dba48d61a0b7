"""The concept editors' image readers (UCE's debias, ESD's `read_until`): by default CLIP zero-shot with the
registry's own CLIP model; another CLIP or the shapes world's meters only when chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cli_helpers import snapshot, zoo_cli
from test_editor_uce import loaded
from tiny_models import tiny_sd_pipeline

import modelzoo
from modelzoo.demo.shapes import draw, sample_specs
from modelzoo.demo.train_clip import TrainingProfile, train_clip
from modelzoo.editors.esd import EsdRequest
from modelzoo.editors.readers import clip_reader
from modelzoo.editors.uce import UceEditor, UceRequest
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.clip import load_clip

SHAPE_TEMPLATES = ("a {} circle", "a {} square", "a {} triangle", "a {} star")
# Three samples cannot read half and half, so the first iteration always moves the weights.
TINY_DEBIAS = ["--debias", "a cat", "--attribute", "red", "--attribute", "yellow", "--max-iterations", "1",
               "--samples", "3"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes-world CLIP trained for 60 steps (seconds): it reads the colour of every drawing it was tested on."""
    out = tmp_path_factory.mktemp("clip") / "shapes-clip"
    train_clip(out, seed=0, profile=TrainingProfile(steps=60, batch_size=32, sketches=0, lr=3e-3, warmup=5,
                                                    eval_images=64))
    return out


def test_clip_reader_reads_the_colour_proportions_of_drawings(clip_dir: Path) -> None:
    """Three red drawings to one yellow, of every shape; each attribute's prompts span the shapes."""
    specs = sample_specs(40, seed=1, colours=("red", "red", "red", "yellow"))
    images = np.stack([draw(spec) for spec in specs])
    read = clip_reader(load_clip(clip_dir), SHAPE_TEMPLATES)(images, ("red", "yellow"))

    truth = [spec.colour for spec in specs]
    assert np.mean([a == b for a, b in zip(read, truth, strict=True)]) >= 0.9
    assert read.count("red") / len(read) == pytest.approx(truth.count("red") / len(truth), abs=0.1)


def test_debias_reads_with_the_registrys_clip_model_by_default(zoo: modelzoo.Zoo, sd_dir: Path,
                                                                  clip_dir: Path) -> None:
    sd = zoo.import_(sd_dir, "sd")
    clip = zoo.import_(clip_dir, "shapes-clip")
    request = UceRequest(mode="debias", debias=("a cat",), attributes=("red", "yellow"), max_iterations=1,
                         samples_per_prompt=2, sample_steps=2)

    child = zoo.edit(sd.ref, "uce", request)

    assert child.params["reader"] == child.params["request"]["reader"] == f"clip:zoo:{clip.ref}"
    assert "read" not in child.params and "read" not in child.params["request"]
    assert child.metrics["read_share"] == [1.0]  # zero-shot over the attributes reads every image as one


def test_esd_reads_with_the_registrys_clip_model_until_the_concept_is_gone(zoo: modelzoo.Zoo, sd_dir: Path,
                                                                            clip_dir: Path) -> None:
    sd = zoo.import_(sd_dir, "sd")
    clip = zoo.import_(clip_dir, "shapes-clip")
    request = EsdRequest(erase=("red",), preserve=("yellow",), templates=SHAPE_TEMPLATES[:1], iterations=4,
                         ddim_steps=2, read_until=0.0, read_every=2, read_images=2)

    child = zoo.edit(sd.ref, "esd", request)

    assert child.params["reader"] == child.params["request"]["reader"] == f"clip:zoo:{clip.ref}"
    assert "read" not in child.params and "read" not in child.params["request"]
    reads = child.metrics["reads"]
    assert [step for step, _ in reads] in ([2], [2, 4]) and child.metrics["iterations_run"] == reads[-1][0]
    assert all(0 <= share <= 1 for _, share in reads) and (len(reads) == 2 or reads[0][1] == 0)


def test_debias_without_a_reader_is_refused_by_the_editor() -> None:
    with pytest.raises(BadInput, match="not loaded"):
        UceEditor().edit(loaded(tiny_sd_pipeline()), UceRequest(mode="debias", debias=("a cat",),
                                                                attributes=("red", "yellow")))


def test_debias_in_a_registry_without_clip_is_refused_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path
) -> None:
    assert zoo_cli(capsys, home, "import", str(sd_dir), "--name", "sd").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "edit", "uce", "sd", *TINY_DEBIAS)
    assert result.code == 2 and "has none" in result.err and len(result.err.splitlines()) == 1
    assert snapshot(home) == before


def test_cli_reader_chooses_among_clip_models_or_loads_one_from_a_folder(
    capsys: pytest.CaptureFixture[str], home: Path, sd_dir: Path, clip_dir: Path
) -> None:
    for name in ("clip-a", "clip-b", "sd"):
        assert zoo_cli(capsys, home, "import", str(sd_dir if name == "sd" else clip_dir), "--name", name).code == 0
    refused = zoo_cli(capsys, home, "edit", "uce", "sd", *TINY_DEBIAS)
    assert refused.code == 2 and "2 CLIP models (clip-a, clip-b)" in refused.err

    readers = {}
    for reader in ("clip:zoo:clip-b", f"clip:{clip_dir}"):
        result = zoo_cli(capsys, home, "edit", "uce", "sd", *TINY_DEBIAS, "--reader", reader, "--json")
        assert result.code == 0, result.err
        readers[reader] = modelzoo.open(home).get("sd").params["reader"]
    assert readers == {"clip:zoo:clip-b": "clip:zoo:clip-b@1", f"clip:{clip_dir}": f"clip:{clip_dir.resolve()}"}
