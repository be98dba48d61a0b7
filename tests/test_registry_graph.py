"""Lineage graph, audit trail, hash lookup, storage cost, no-op refusal and SQL filters."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from safetensors.torch import load_file, save_file

import modelzoo
from modelzoo.registry.queries import ListFilter

W = "transformer.ln_f.weight"


def _child(zoo, parent, value, **kwargs):
    return zoo.commit(parent, {W: torch.full((32,), float(value))}, method=kwargs.pop("method", "scale"), **kwargs)


def test_compose_records_two_parents_and_descendants_are_found_recursively(zoo, gpt2_dir):
    base = zoo.import_(gpt2_dir, "base")
    a = _child(zoo, base.ref, 2, name="edit-a")
    b = _child(zoo, base.ref, 3, name="edit-b")
    merged = zoo.commit(a.ref, {W: torch.full((32,), 5.0)}, method="compose", relation="compose",
                        other_parents=[b.ref], name="merged")
    grandchild = _child(zoo, merged.ref, 7)
    assert sorted((p.ref, p.relation) for p in merged.parents) == [("edit-a@1", "compose"), ("edit-b@1", "compose")]
    lineage = zoo.lineage(base.ref)
    assert [d.ref for d in lineage.descendants] == ["edit-a@1", "edit-b@1", "merged@1", "merged@2"]
    assert {d.ref: d.depth for d in lineage.descendants}["merged@2"] == 3
    up = zoo.lineage(grandchild.ref).ancestors
    assert [(n.ref, n.depth) for n in up] == [("merged@1", 1), ("edit-a@1", 2), ("edit-b@1", 2), ("base@1", 3)]
    found = zoo.list(ListFilter(descendant_of=base.ref))
    assert {m.name: m.matching_versions for m in found} == {"edit-a": [1], "edit-b": [1], "merged": [1, 2]}


def test_lineage_json_shape(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "base")
    _child(zoo, base.ref, 2, params={"factor": 2})
    result = zoo_cli(capsys, home, "lineage", "base@1", "--json")
    data = json.loads(result.out)
    assert data["ancestors"] == []
    assert data["descendants"] == [
        {"ref": "base@2", "relation": "edit", "method": "scale", "params": {"factor": 2}, "depth": 1}
    ]


def test_alias_moved_three_times_keeps_its_full_history(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "m")
    for value in (2, 3):
        _child(zoo, base.ref, value)
    for ref in ("m@1", "m@3", "m@2"):
        assert zoo_cli(capsys, home, "alias", "set", ref, "prod").code == 0
    history = json.loads(zoo_cli(capsys, home, "alias", "history", "m@prod", "--json").out)
    assert [h["ref"] for h in history] == ["m@1", "m@3", "m@2"]
    assert history[0]["at"] <= history[1]["at"] <= history[2]["at"]
    assert zoo.get("m@prod").number == 2


def test_tag_changes_are_appended_to_the_audit_trail(zoo, gpt2_dir):
    from sqlalchemy import select

    from modelzoo.registry.schema import AuditEvent

    zoo.import_(gpt2_dir, "m")
    zoo.tag("m", "stage", "dev")
    zoo.tag("m", "stage", "prod")
    with zoo.registry.db.read() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.kind == "tag")).all()
    assert [(e.name, e.value) for e in events] == [("stage", "dev"), ("stage", "prod")]


def test_find_by_tensor_hash_file_hash_and_prefix(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "m")
    child = _child(zoo, base.ref, 2)
    blob = zoo.registry.manifest(base.ref)[("tensor", "transformer.wte.weight")]
    hits = zoo.find(blob.sha256)
    assert {(h.ref, h.name) for h in hits} == {("m@1", "transformer.wte.weight"), ("m@2", "transformer.wte.weight")}
    config_sha = hashlib.sha256((gpt2_dir / "config.json").read_bytes()).hexdigest()  # `sha256sum config.json`
    assert {h.ref for h in zoo.find(config_sha[:10])} == {"m@1", "m@2"}
    assert [h.ref for h in zoo.find(child.manifest_hash)] == ["m@2"]
    result = zoo_cli(capsys, home, "find", blob.sha256[:12], "--json")
    assert result.code == 0 and len(json.loads(result.out)) == 2
    assert zoo_cli(capsys, home, "find", "abc").code == 2
    assert zoo_cli(capsys, home, "find", "0" * 64).code == 2


def test_show_and_stats_report_what_storage_really_costs(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "m")
    child = _child(zoo, base.ref, 2)
    shown = json.loads(zoo_cli(capsys, home, "show", child.ref, "--json").out)
    assert shown["logical_bytes"] == base.logical_bytes and shown["added_bytes"] == 32 * 4
    stats = json.loads(zoo_cli(capsys, home, "stats", "--json").out)
    assert stats["logical_bytes"] == 2 * base.logical_bytes
    distinct = {b.sha256: b.nbytes for b in zoo.registry.manifest(base.ref).values()}  # equal tensors stored once
    assert stats["stored_bytes"] == sum(distinct.values()) + 32 * 4
    assert stats["dedup_ratio"] == pytest.approx(2 * base.logical_bytes / stats["stored_bytes"], abs=1e-3)


def test_noop_edit_is_refused_unless_allowed(zoo, home, gpt2_dir):
    base = zoo.import_(gpt2_dir, "m")
    same = {W: zoo.tensors(base.ref)[W].clone()}
    before = snapshot(home)
    with pytest.raises(modelzoo.BadInput, match="changes no tensor"):
        zoo.commit(base.ref, same, method="noop")
    assert snapshot(home) == before
    allowed = zoo.commit(base.ref, same, method="noop", allow_noop=True)
    assert allowed.manifest_hash == base.manifest_hash
    edited = _child(zoo, base.ref, 9)
    assert edited.manifest_hash != base.manifest_hash


def _variant(gpt2_dir, out, keep_fraction_names):
    tensors = load_file(gpt2_dir / "model.safetensors")
    for name in keep_fraction_names:
        tensors[name] = tensors[name] + 0.5
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text((gpt2_dir / "config.json").read_text())
    return out, tensors


def test_base_auto_records_the_version_sharing_most_bytes(zoo, gpt2_dir, tmp_path):
    from tiny_models import save_tiny_gpt2

    base = zoo.import_(gpt2_dir, "base")
    tensors = load_file(gpt2_dir / "model.safetensors")
    total = sum(t.nbytes for t in tensors.values())
    # Change tensors worth about 10% of the bytes: the rest (about 90%) is shared with base@1.
    changed, size = [], 0
    for name, t in sorted(tensors.items(), key=lambda kv: kv[1].nbytes):
        if size + t.nbytes > 0.1 * total:
            break
        changed.append(name)
        size += t.nbytes
    variant, _ = _variant(gpt2_dir, tmp_path / "variant", changed)
    info = zoo.import_(variant, "finetuned", base="auto")
    assert [(p.ref, p.relation) for p in info.parents] == [("base@1", "finetune")]
    evidence = info.parents[0].evidence
    assert evidence["detected"] and 0.85 < evidence["fraction"] < 0.95
    assert info.source["related"][0]["ref"] == base.ref

    unrelated = save_tiny_gpt2(tmp_path / "other", seed=123)
    other = zoo.import_(unrelated, "other", base="auto")
    assert other.parents == []


def test_declared_base_and_model_card_base_model(zoo, gpt2_dir, tmp_path):
    zoo.import_(gpt2_dir, "gpt2")
    variant, _ = _variant(gpt2_dir, tmp_path / "ft", ["transformer.wte.weight"])
    (variant / "README.md").write_text("---\nbase_model: openai-community/gpt2\n---\n# A fine-tune\n")
    info = zoo.import_(variant, "ft")
    assert [(p.ref, p.relation) for p in info.parents] == [("gpt2@1", "finetune")]
    declared = zoo.import_(variant, "ft2", base="gpt2@1", relation="distill")
    assert [(p.ref, p.relation) for p in declared.parents] == [("gpt2@1", "distill")]


def test_list_filters_compose(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "lm-a", tags={"team": "x"})
    zoo.import_(gpt2_dir, "lm-b", tags={"team": "y"})
    _child(zoo, base.ref, 2, method="uce")
    _child(zoo, base.ref, 3, method="memit")

    def names(*args):
        result = zoo_cli(capsys, home, "list", "--json", *args)
        assert result.code == 0, result.err
        return {m["name"]: m["matching_versions"] for m in json.loads(result.out)}

    assert names() == {"lm-a": [1, 2, 3], "lm-b": [1]}
    assert names("--tag", "team=x") == {"lm-a": [1, 2, 3]}
    assert names("--method", "memit") == {"lm-a": [3]}
    assert names("--method", "uce", "--tag", "team=y") == {}
    assert names("--descendant-of", "lm-a@1", "--family", "lm") == {"lm-a": [2, 3]}
    assert names("--since", "2000-01-01", "--family", "gan") == {}
    assert names("--since", "2000-01-01", "--method", "import") == {"lm-a": [1], "lm-b": [1]}
    listed = json.loads(zoo_cli(capsys, home, "list", "--json").out)
    assert {"name", "family", "latest", "tags", "description"} <= set(listed[0])
    assert zoo_cli(capsys, home, "list", "--since", "yesterday").code == 2
