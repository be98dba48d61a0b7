import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from PIL import Image

import modelzoo
from modelzoo.registry.families.gan import GanFamily, save_gan
from modelzoo.registry.families.stylegan import StyleGanConfig, build
from modelzoo.registry.safetensors_io import write_tensors

TINY = StyleGanConfig.tiny()


@pytest.fixture
def gan_home(home: Path, zoo: modelzoo.Zoo, tmp_path: Path) -> Path:
    zoo.import_(save_gan(build(TINY, seed=0), TINY, tmp_path / "gan"), name="faces")
    return home


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sample_writes_one_png_per_seed_and_a_grid(capsys, gan_home, zoo, tmp_path):
    out, grid = tmp_path / "out", tmp_path / "sheets" / "grid.png"
    r = zoo_cli(capsys, gan_home, "sample", "faces", "--seed", "5", "--n", "3", "--out", str(out),
                "--grid", str(grid))
    assert r.code == 0, r.err
    assert sorted(p.name for p in out.iterdir()) == ["5.png", "6.png", "7.png"]
    model = GanFamily().load(zoo.registry, "faces@1")
    for sample in GanFamily().sample(model, [5, 6, 7]):
        assert np.array_equal(_png(out / f"{sample.seed}.png"), sample.image)
    sheet = _png(grid)
    assert sheet.shape == (64, 64, 3)  # 3 images of 32x32 in a 2x2 grid
    assert np.array_equal(sheet[:32, 32:], _png(out / "6.png")) and not sheet[32:, 32:].any()
    assert "wrote 3 samples of faces@1" in r.out


def test_sampling_twice_writes_identical_bytes_and_json_lists_the_files(capsys, gan_home, tmp_path):
    first = zoo_cli(capsys, gan_home, "sample", "faces@1", "--seed", "2", "--n", "2", "--out", str(tmp_path / "a"))
    second = zoo_cli(capsys, gan_home, "sample", "faces", "--seed", "2", "--n", "2", "--out", str(tmp_path / "b"),
                     "--json")
    assert first.code == second.code == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    report = json.loads(second.out)
    assert report["ref"] == "faces@1" and report["family"] == "gan" and report["seeds"] == [2, 3]
    assert report["files"] == [str(tmp_path / "b" / "2.png"), str(tmp_path / "b" / "3.png")]


def test_sample_without_out_writes_into_a_folder_named_after_the_version(capsys, gan_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = zoo_cli(capsys, gan_home, "sample", "faces", "--n", "2")
    assert r.code == 0, r.err
    assert sorted(_files(tmp_path / "samples" / "faces-v1")) == ["0.png", "1.png"]


def test_a_child_version_samples_the_same_seeds_differently(capsys, gan_home, zoo, tmp_path):
    name = "synthesis.b8.conv1.weight"
    weight = zoo.tensors("faces@1", [name])[name]
    zoo.commit("faces@1", {name: -weight}, method="test-edit")
    for ref in ("faces@1", "faces@2"):
        assert zoo_cli(capsys, gan_home, "sample", ref, "--n", "2", "--out", str(tmp_path / ref)).code == 0
    assert sorted(_files(tmp_path / "faces@1")) == sorted(_files(tmp_path / "faces@2"))
    assert _files(tmp_path / "faces@1")["0.png"] != _files(tmp_path / "faces@2")["0.png"]


@pytest.fixture
def unknown_family(zoo: modelzoo.Zoo, tmp_path: Path) -> str:
    """A version whose family ("vae") has no installed adapter."""
    src = tmp_path / "vae"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"family": "vae"}))
    with open(src / "model.safetensors", "wb") as f:
        write_tensors(f, {"decoder.weight": torch.ones(2, 2)})
    return zoo.import_(src, name="vae").ref


def _assert_refused(capsys, home: Path, args: list[str], out: Path, message: str) -> None:
    before = snapshot(home)
    out_before = _files(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    r = zoo_cli(capsys, home, "sample", *args)
    assert r.code == 2, (r.out, r.err)
    assert r.err.startswith("error: ") and r.err.count("\n") == 1 and message in r.err, r.err
    assert r.out == ""
    assert snapshot(home) == before
    assert (_files(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)) == out_before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "--n must be at least 1"),
        (["--n", "-3"], "--n must be at least 1"),
        (["--seed", "-1"], "seeds must lie in"),
        (["--prompt", "a cat"], "drop --prompt"),
        (["--steps", "10"], "no option ['steps']"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--grid", "sheet.jpg"], ".png"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, gan_home, tmp_path, args, message):
    out = tmp_path / "out"
    _assert_refused(capsys, gan_home, ["faces", "--out", str(out), "--grid", str(tmp_path / "g.png"), *args],
                    out, message)
    assert not out.exists() and not (tmp_path / "g.png").exists()


def test_out_that_is_an_existing_file_is_refused(capsys, gan_home, tmp_path):
    out = tmp_path / "taken"
    out.write_text("keep me")
    _assert_refused(capsys, gan_home, ["faces", "--out", str(out)], out, "exists and is not a folder")
    _assert_refused(capsys, gan_home, ["faces", "--out", str(out / "below")], out, "exists and is not a folder")
    assert out.read_text() == "keep me"


def test_an_existing_out_folder_keeps_its_other_files_when_input_is_bad(capsys, gan_home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _assert_refused(capsys, gan_home, ["faces", "--out", str(out), "--prompt", "x"], out, "drop --prompt")


def test_a_family_without_an_installed_adapter_is_refused(capsys, home, unknown_family, tmp_path):
    out = tmp_path / "out"
    _assert_refused(capsys, home, [unknown_family, "--out", str(out)], out, "unknown model family 'vae'")
    assert not out.exists()


def test_an_unknown_version_is_refused(capsys, gan_home, tmp_path):
    out = tmp_path / "out"
    _assert_refused(capsys, gan_home, ["faces@9", "--out", str(out)], out, "faces@9")
    assert not out.exists()


# The diffusion and LM adapters are written separately; these run once their modules exist.


@pytest.fixture
def sd_home(home: Path, zoo: modelzoo.Zoo, sd_dir: Path) -> Path:
    pytest.importorskip("modelzoo.registry.families.diffusion")
    zoo.import_(sd_dir, name="sd")
    return home


@pytest.fixture
def lm_home(home: Path, zoo: modelzoo.Zoo, gpt2_dir: Path) -> Path:
    pytest.importorskip("modelzoo.registry.families.lm")
    zoo.import_(gpt2_dir, name="gpt2")
    return home


def test_diffusion_writes_one_png_per_seed_for_a_prompt(capsys, sd_home, tmp_path):
    out = tmp_path / "out"
    r = zoo_cli(capsys, sd_home, "sample", "sd", "--prompt", "a red circle", "--seed", "3", "--n", "2",
                "--steps", "2", "--out", str(out), "--grid", str(tmp_path / "grid.png"))
    assert r.code == 0, r.err
    assert sorted(_files(out)) == ["3.png", "4.png"]
    assert _png(out / "3.png").ndim == 3 and (tmp_path / "grid.png").is_file()


def test_diffusion_without_a_prompt_is_refused(capsys, sd_home, tmp_path):
    out = tmp_path / "out"
    _assert_refused(capsys, sd_home, ["sd", "--out", str(out)], out, "needs --prompt")
    assert not out.exists()


def test_lm_prints_one_json_line_per_seed_or_writes_them_to_out(capsys, lm_home, tmp_path):
    prompt = "5 17 3"  # the tiny GPT-2 has no tokenizer, so it speaks token ids
    r = zoo_cli(capsys, lm_home, "sample", "gpt2", "--prompt", prompt, "--seed", "4", "--n", "2")
    assert r.code == 0, r.err
    lines = [json.loads(line) for line in r.out.splitlines()]
    assert [(d["seed"], d["prompt"]) for d in lines] == [(4, prompt), (5, prompt)]
    assert all(isinstance(d["text"], str) and d["text"] for d in lines)
    out = tmp_path / "out"
    r = zoo_cli(capsys, lm_home, "sample", "gpt2", "--prompt", prompt, "--seed", "4", "--n", "2", "--out", str(out))
    assert r.code == 0, r.err
    assert [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()] == lines


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--grid", "GRID"], "--grid needs an image model"), (["--steps", "3"], "takes no --steps")],
)
def test_lm_with_a_grid_or_steps_is_refused(capsys, lm_home, tmp_path, args, message):
    out, grid = tmp_path / "out", tmp_path / "g.png"
    args = [str(grid) if a == "GRID" else a for a in args]
    _assert_refused(capsys, lm_home, ["gpt2", "--prompt", "1 2", "--out", str(out), *args], out, message)
    assert not out.exists() and not grid.exists()
