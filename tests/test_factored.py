"""Factored tensors: a child stores scale * B @ A over its parent's tensor, and every reader sees the merge."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import zoo_cli

from modelzoo.registry.blobs import FACTORED
from modelzoo.registry.errors import BadInput, Corrupted
from modelzoo.registry.factors import MAX_DEPTH, LowRank, merge

W = "transformer.h.0.mlp.c_fc.weight"  # (32, 128) in the tiny GPT-2


def change(seed: int, rank: int = 2, shape: tuple[int, int] = (32, 128), scale: float = 0.5) -> LowRank:
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(shape[0], rank, generator=g), torch.randn(rank, shape[1], generator=g), scale)


def test_low_rank_child_stores_only_its_factors_and_loads_merged(zoo, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2")
    delta = change(0)
    child = zoo.commit(base.ref, {W: delta}, method="lowrank")

    assert child.added_bytes == delta.nbytes
    assert child.logical_bytes == base.logical_bytes
    expected = zoo.tensors(base.ref)[W] + 0.5 * delta.B @ delta.A
    assert torch.allclose(zoo.tensors(child.ref)[W], expected, atol=1e-6)
    assert zoo.registry.manifest(child.ref)[("tensor", W)].kind == FACTORED
    lm = zoo.load(child.ref).pipeline
    assert torch.allclose(lm.state_dict()[W], expected, atol=1e-6)


def test_factored_and_dense_children_have_the_same_manifest_hash(zoo, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2")
    delta = change(1)
    factored = zoo.commit(base.ref, {W: delta}, method="lowrank")
    dense = zoo.commit(base.ref, {W: merge(zoo.tensors(base.ref)[W].clone(), delta)}, method="dense",
                       allow_noop=True)
    assert factored.manifest_hash == dense.manifest_hash
    diff = zoo.diff(base.ref, factored.ref)
    assert [c.tensor for c in diff.changed] == [W] and diff.changed[0].relative_change > 0


def test_chain_of_factored_children_loads_and_is_merged_dense_past_the_depth_limit(zoo, gpt2_dir):
    ref = zoo.import_(gpt2_dir, "gpt2").ref
    expected = zoo.tensors(ref)[W].double()
    kinds = []
    for i in range(MAX_DEPTH + 2):
        delta = change(10 + i)
        expected = expected + 0.5 * (delta.B.double() @ delta.A.double())
        ref = zoo.commit(ref, {W: delta}, method="lowrank").ref
        kinds.append(zoo.registry.manifest(ref)[("tensor", W)].kind)
        assert torch.allclose(zoo.tensors(ref)[W].double(), expected, atol=1e-4)
    assert kinds == [FACTORED] * MAX_DEPTH + ["tensor", FACTORED]


def test_change_as_large_as_the_tensor_is_stored_dense(zoo, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.commit(base.ref, {W: change(2, rank=26)}, method="lowrank")  # 26 * (32 + 128) >= 32 * 128
    assert zoo.registry.manifest(child.ref)[("tensor", W)].kind == "tensor"


@pytest.mark.parametrize("bad, message", [
    (LowRank(torch.ones(32, 2), torch.ones(3, 128)), "ranks disagree"),
    (LowRank(torch.ones(31, 2), torch.ones(2, 128)), "does not fit"),
    (LowRank(torch.ones(32, 2), torch.full((2, 128), float("nan"))), "NaN"),
])
def test_bad_factors_are_refused_and_nothing_is_registered(zoo, gpt2_dir, bad, message):
    base = zoo.import_(gpt2_dir, "gpt2")
    with pytest.raises(BadInput, match=message):
        zoo.commit(base.ref, {W: bad}, method="lowrank")
    assert [v.number for v in zoo.versions("gpt2")] == [1]


def test_verify_names_the_version_of_a_damaged_factor_and_load_refuses_it(zoo, home, gpt2_dir, capsys):
    base = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.commit(base.ref, {W: change(3)}, method="lowrank")
    grandchild = zoo.commit(child.ref, {W: change(4)}, method="lowrank")
    factored = zoo.registry.manifest(child.ref)[("tensor", W)]
    [factor_hit] = [h for h in zoo.find(_factor_sha(zoo, factored.sha256)) if h.kind == "factor"]
    assert (factor_hit.ref, factor_hit.name) == (child.ref, f"{W} (B)")
    path = home / "blobs" / f"{factor_hit.sha256[:2]}/{factor_hit.sha256[2:4]}/{factor_hit.sha256}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))

    result = zoo_cli(capsys, home, "verify", "--json")
    assert result.code == 1
    [damaged] = json.loads(result.out)["damaged"]
    assert damaged["sha256"] == factor_hit.sha256
    assert damaged["versions"] == [child.ref, grandchild.ref]
    assert zoo_cli(capsys, home, "verify", grandchild.ref).code == 1
    with pytest.raises(Corrupted):
        zoo.tensors(grandchild.ref)
    assert zoo_cli(capsys, home, "export", grandchild.ref, str(home.parent / "out")).code == 1


def _factor_sha(zoo, sha256: str) -> str:
    from modelzoo.registry.factors import factor_rows

    with zoo.registry.db.read() as session:
        return factor_rows(session, [sha256])[sha256].b


def test_gc_keeps_factors_while_a_version_needs_them_and_frees_them_after_purge(zoo, home, gpt2_dir):
    base = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.commit(base.ref, {W: change(5)}, method="lowrank")
    expected = zoo.tensors(child.ref)[W].clone()
    assert zoo.gc(grace_s=0).blobs_removed == 0
    assert torch.equal(zoo.tensors(child.ref)[W], expected)
    assert zoo.verify().ok

    zoo.delete(child.ref)
    report = zoo.gc(purge_deleted=True, grace_s=0)
    assert (report.blobs_removed, report.bytes_freed) == (3, change(5).nbytes)  # the factored row, B and A
    assert zoo.verify().ok


def test_export_writes_the_merged_tensor(zoo, home, gpt2_dir):
    from safetensors.torch import load_file

    base = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.commit(base.ref, {W: change(6)}, method="lowrank")
    out = zoo.export(child.ref, home.parent / "exported")
    assert torch.equal(load_file(out / "model.safetensors")[W], zoo.tensors(child.ref)[W])


@pytest.mark.postgres
def test_factored_chains_load_verify_and_gc_on_postgres(home, gpt2_dir, pg_database):
    import modelzoo

    zoo = modelzoo.open(home, pg_database)
    base = zoo.import_(gpt2_dir, "gpt2")
    child = zoo.commit(base.ref, {W: change(20)}, method="lowrank")
    grandchild = zoo.commit(child.ref, {W: change(21)}, method="lowrank")
    expected = zoo.tensors(base.ref)[W].double() + sum(
        0.5 * c.B.double() @ c.A.double() for c in (change(20), change(21)))
    assert torch.allclose(zoo.tensors(grandchild.ref)[W].double(), expected, atol=1e-4)
    assert zoo.gc(grace_s=0).blobs_removed == 0 and zoo.verify().ok
    assert [h.ref for h in zoo.find(_factor_sha(zoo, zoo.registry.manifest(child.ref)[("tensor", W)].sha256))
            if h.kind == "factor"] == [child.ref]
    zoo.delete(grandchild.ref)
    assert zoo.gc(purge_deleted=True, grace_s=0).blobs_removed == 3
    assert torch.allclose(zoo.tensors(child.ref)[W], zoo.tensors(base.ref)[W] + 0.5 * change(20).B @ change(20).A,
                          atol=1e-5)
