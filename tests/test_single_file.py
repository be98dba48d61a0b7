"""Single-file SD checkpoints (the original LDM layout): exported from a registered pipeline, imported by
diffusers' own from_single_file with an offline config, and the pipeline survives the round trip."""

from __future__ import annotations

import torch
from cli_helpers import snapshot, zoo_cli
from safetensors import safe_open
from tiny_models import sd_images

import modelzoo


def test_single_file_round_trip_gives_the_same_pipeline(zoo, sd_dir, tmp_path):
    base = zoo.import_(sd_dir, "sd")
    path = zoo.export(base.ref, tmp_path / "model.safetensors", format="single-file")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)

    again = zoo.import_(path, "sd-single")  # the config: the registered version of the same shapes
    assert again.manifest_hash != "" and again.source["single_file"] == "model.safetensors"
    mine, theirs = zoo.tensors(again.ref), zoo.tensors(base.ref)
    assert set(mine) == set(theirs) and all(torch.equal(mine[n], theirs[n]) for n in mine)
    first, second = (sd_images(zoo.load(ref).pipeline) for ref in (base.ref, again.ref))
    assert torch.equal(first, second)
    assert any(h.kind == "source file" for h in zoo.find(_sha256(path)))


def _sha256(path) -> str:  # type: ignore[no-untyped-def]
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_config_folder_converts_a_checkpoint_in_an_empty_registry(sd_dir, tmp_path):
    source = modelzoo.open(tmp_path / "a")
    path = source.export(source.import_(sd_dir, "sd").ref, tmp_path / "model.safetensors", format="single-file")
    fresh = modelzoo.open(tmp_path / "b")
    info = fresh.import_(path, "sd", family="diffusion", config=sd_dir)
    assert info.family == "diffusion" and info.source["config"] == str(sd_dir)


def test_without_an_offline_config_the_import_is_refused_and_nothing_stored(capsys, home, sd_dir, tmp_path):
    source = modelzoo.open(tmp_path / "a")
    path = source.export(source.import_(sd_dir, "sd").ref, tmp_path / "model.safetensors", format="single-file")
    assert zoo_cli(capsys, home, "init").code == 0
    before = snapshot(home)
    result = zoo_cli(capsys, home, "import", str(path), "--name", "sd", "--family", "diffusion")
    assert result.code == 2 and "offline" in result.err and len(result.err.strip().splitlines()) == 1
    assert snapshot(home) == before


def test_single_file_export_of_a_language_model_is_refused(zoo, gpt2_dir, tmp_path, capsys, home):
    zoo.import_(gpt2_dir, "gpt2")
    result = zoo_cli(capsys, home, "export", "gpt2@1", str(tmp_path / "x.safetensors"), "--format", "single-file")
    assert result.code == 2 and "diffusion" in result.err
    assert not (tmp_path / "x.safetensors").exists()
