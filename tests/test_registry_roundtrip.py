"""Import -> store -> export round trips through the native libraries, and content-addressed dedup."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import sd_images

import modelzoo


def _blob_files(home: Path) -> set[Path]:
    return {p for p in (home / "blobs").rglob("*") if p.is_file()}


def test_gpt2_export_loads_in_transformers_with_identical_outputs(zoo, gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    info = zoo.import_(gpt2_dir, "gpt2-tiny")
    assert info.ref == "gpt2-tiny@1" and info.family == "lm" and info.method == "import"
    out = zoo.export("gpt2-tiny@1", tmp_path / "export")
    original = AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(20).reshape(2, 10)
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "gpt2-tiny@1" in card and info.manifest_hash in card


def test_diffusers_export_loads_with_from_pretrained_and_samples_identically(zoo, sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    info = zoo.import_(sd_dir, "sd-tiny")
    assert info.family == "diffusion"
    assert any(n.startswith("unet/") for n in zoo.tensors(info.ref))
    out = zoo.export(info.ref, tmp_path / "export")
    original = StableDiffusionPipeline.from_pretrained(sd_dir)
    exported = StableDiffusionPipeline.from_pretrained(out)
    assert torch.equal(sd_images(original), sd_images(exported))


def test_importing_the_same_model_twice_stores_no_new_bytes(zoo, home, gpt2_dir):
    first = zoo.import_(gpt2_dir, "gpt2")
    files = _blob_files(home)
    second = zoo.import_(gpt2_dir, "gpt2")
    assert second.number == 2 and second.added_bytes == 0 and first.added_bytes > 0
    assert _blob_files(home) == files
    assert first.manifest_hash == second.manifest_hash


def test_child_version_stores_only_changed_tensors(zoo, home, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2")
    tensors = zoo.tensors(base.ref)
    names = ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.wte.weight"]
    before = _blob_files(home)
    changed = {n: tensors[n] + 1.0 for n in names}
    child = zoo.commit(base.ref, changed, method="test-edit", params={"k": 3})
    added = _blob_files(home) - before
    assert len(added) == 3
    assert child.added_bytes == sum(tensors[n].nbytes for n in names)
    assert child.parents[0].ref == base.ref and child.parents[0].relation == "edit"
    reloaded = zoo.tensors(child.ref)
    for n in names:
        assert torch.equal(reloaded[n], tensors[n] + 1.0)
    diff = zoo.diff(base.ref, child.ref)
    assert sorted(c.tensor for c in diff.changed) == sorted(names)
    for c in diff.changed:
        expected = float(torch.ones_like(tensors[c.tensor]).double().norm() / tensors[c.tensor].double().norm())
        assert abs(c.relative_change - expected) < 1e-6 * expected  # float32 rounding of the +1


def test_single_safetensors_file_with_config_imports_and_exports(zoo, gpt2_dir, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    (single / "weights.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
    (single / "weights.json").write_text((gpt2_dir / "config.json").read_text())
    info = zoo.import_(single / "weights.safetensors", "single")
    assert info.family == "lm"
    out = zoo.export(info.ref, tmp_path / "out")
    assert json.loads((out / "config.json").read_text()) == json.loads((gpt2_dir / "config.json").read_text())


def test_lineage_tags_aliases_and_soft_delete(zoo, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2", tags={"license": "mit"})
    w = "transformer.ln_f.weight"
    child = zoo.commit(base.ref, {w: zoo.tensors(base.ref)[w] * 2}, method="scale", params={"by": 2})
    grandchild = zoo.commit(child.ref, {w: zoo.tensors(base.ref)[w] * 3}, method="scale", name="gpt2-scaled")
    lineage = zoo.lineage(child.ref)
    assert [a.ref for a in lineage.ancestors] == ["gpt2@1"]
    assert lineage.descendants[0].method == "scale" and lineage.descendants[0].relation == "edit"
    assert [d.ref for d in lineage.descendants] == ["gpt2-scaled@1"]
    ancestors = zoo.lineage(grandchild.ref).ancestors
    assert [a.ref for a in ancestors] == ["gpt2@2", "gpt2@1"] and ancestors[0].params == {"by": 2}
    zoo.set_alias("gpt2@1", "prod")
    zoo.set_alias("gpt2@2", "prod")
    assert zoo.get("gpt2@prod").number == 2
    assert [e.ref for e in zoo.alias_history("gpt2", "prod")] == ["gpt2@1", "gpt2@2"]
    zoo.tag("gpt2@2", "stage", "candidate")
    assert zoo.get("gpt2@2").tags == {"license": "mit", "stage": "candidate"}
    zoo.delete("gpt2@2")
    assert zoo.get("gpt2@latest").number == 1
    assert zoo.get("gpt2@2").status == "deleted"
    zoo.restore("gpt2@2")
    assert zoo.get("gpt2@latest").number == 2


def test_gc_removes_only_unreferenced_blobs(zoo, home, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2")
    w = "transformer.ln_f.weight"
    child = zoo.commit(base.ref, {w: zoo.tensors(base.ref)[w] * 2}, method="scale")
    (home / "blobs" / "ab").mkdir(parents=True, exist_ok=True)
    (home / "blobs" / "ab" / "stray").write_bytes(b"left by a crash")
    assert zoo.gc(grace_s=0).blobs_removed == 0
    assert not (home / "blobs" / "ab" / "stray").exists()
    zoo.delete(child.ref)
    report = zoo.gc(purge_deleted=True, grace_s=0)
    assert report.blobs_removed == 1 and report.versions_purged == 1
    assert zoo.verify().ok
    assert torch.equal(zoo.tensors(base.ref)[w], modelzoo.open(home).tensors("gpt2@1")[w])
