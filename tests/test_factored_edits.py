"""Editors whose change is low-rank register factored children: MEMIT/AlphaEdit, GAN warping, UCE, compose."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_editor_memit import FACTS, SMALL
from test_family_lm import tiny_bpe_tokenizer
from tiny_models import tiny_gpt2

from modelzoo.editors.base import get_editor
from modelzoo.editors.memit import MemitRequest
from modelzoo.registry.blobs import FACTORED


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ten_facts() -> list[dict[str, object]]:
    subjects = ["France", "circle", "Italy", "square", "red", "blue", "Paris", "Rome", "mat", "capital"]
    return [{"prompt": "The capital of {} is", "subject": s, "target_new": "Rome", "target_true": "Paris"}
            for s in subjects]


def save_gpt2_small_shaped(directory: Path) -> Path:
    """GPT-2 small's blocks (12 layers, width 768, MLP 3072) with random weights and a tiny vocabulary."""
    tokenizer = tiny_bpe_tokenizer()
    model = tiny_gpt2(seed=2, n_layer=12, n_embd=768, vocab_size=len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.bos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def logits(zoo, ref: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return zoo.load(ref).pipeline(ids).logits


@pytest.mark.slow
def test_memit_ten_edits_on_gpt2_small_shape_store_two_percent_of_the_dense_bytes(zoo, tmp_path):
    parent = zoo.import_(save_gpt2_small_shaped(tmp_path / "gpt2-small"), "gpt2s")
    request = MemitRequest.of(ten_facts(), stats_samples=256, hparams=SMALL)
    result = get_editor("memit").edit(zoo.load(parent.ref), request)
    assert set(result.factors) == set(result.changed) and {c.rank for c in result.factors.values()} == {10}

    dense = zoo.commit(parent.ref, result.changed, "memit", name="dense")
    factored = zoo.commit(parent.ref, result.factors, "memit", name="factored")
    assert factored.added_bytes <= 0.02 * dense.added_bytes
    assert relative_error(logits(zoo, factored.ref), logits(zoo, dense.ref)) < 1e-5


def test_memit_and_alphaedit_children_are_factored_with_rank_the_number_of_edits(zoo, tmp_path):
    from test_editor_memit import _save_tiny_lm

    parent = zoo.import_(_save_tiny_lm(tmp_path / "lm"), "tiny")
    for method in ("memit", "alphaedit"):
        child = zoo.edit(parent.ref, method, MemitRequest.of(FACTS, stats_samples=256, hparams=SMALL))
        kinds = {name: blob.kind for (kind, name), blob in zoo.registry.manifest(child.ref).items()
                 if kind == "tensor" and name.endswith("mlp.c_proj.weight")}
        edited = {c.tensor for c in zoo.diff(parent.ref, child.ref).changed}
        assert edited and all(kinds[name] == FACTORED for name in edited)
        # rank 2: B (128, 2) and A (2, 32); AlphaEdit's B, the residuals R, may be MEMIT's blobs already
        assert 0 < child.added_bytes <= len(edited) * 2 * (128 + 32) * 4


@pytest.fixture
def circles(zoo, tiny_gan_dir):  # type: ignore[no-untyped-def]
    return zoo.import_(tiny_gan_dir, name="circles")


def warp(zoo, ref: str, transform: dict[str, float], layer: str, name: str):  # type: ignore[no-untyped-def]
    from modelzoo.editors.warp import WarpRequest

    request = {"samples": [{"seed": s} for s in range(3)], "transform": transform, "iterations": 5,
               "layer": layer, "rank": 4}
    return zoo.edit(ref, "warp", WarpRequest.from_json(request), name=name)


def kind_of(zoo, ref: str, name: str) -> str:  # type: ignore[no-untyped-def]
    return zoo.registry.manifest(ref)[("tensor", name)].kind


def test_warp_children_and_their_children_are_factored_and_load_what_the_edit_computed(zoo, circles, home,
                                                                                        capsys):
    from cli_helpers import zoo_cli

    name = "synthesis.b8.conv0.weight"
    child = warp(zoo, circles.ref, {"scale_x": 1.3}, "b8.conv0", "wide")
    grandchild = warp(zoo, child.ref, {"shift_x": 0.1}, "b8.conv0", "wider")
    assert kind_of(zoo, child.ref, name) == kind_of(zoo, grandchild.ref, name) == FACTORED
    out, inp, kh, kw = zoo.tensors(circles.ref)[name].shape
    assert child.added_bytes == 4 * (out * kh * kw + inp) * 4  # B (out kh kw, 4), A (4, in), float32
    delta = (zoo.tensors(grandchild.ref)[name] - zoo.tensors(child.ref)[name]).double()
    singular = torch.linalg.svdvals(delta.permute(0, 2, 3, 1).reshape(out * kh * kw, inp))
    assert int((singular > 1e-4 * singular[0]).sum()) == 4
    samples = zoo.sample(grandchild.ref, [0, 1])
    assert all(s.image is not None and s.image.std() > 0 for s in samples)

    from modelzoo.registry.factors import factor_rows

    with zoo.registry.db.read() as session:
        row = factor_rows(session, [zoo.registry.manifest(grandchild.ref)[("tensor", name)].sha256])
    factor = next(r.a for r in row.values() if r.depth == 2)
    path = home / "blobs" / factor[:2] / factor[2:4] / f"{factor}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    assert zoo_cli(capsys, home, "verify", grandchild.ref).code == 1
    assert zoo_cli(capsys, home, "verify", child.ref).code == 0


def test_compose_of_factored_warps_is_factored_and_equals_the_dense_sum(zoo, circles):
    from modelzoo.editors.compose import compose

    a = warp(zoo, circles.ref, {"scale_x": 1.3}, "b8.conv0", "wide")
    b = warp(zoo, circles.ref, {"shift_x": 0.15}, "b8.conv0", "moved")
    c = warp(zoo, circles.ref, {"shift_x": -0.1}, "b4.conv1", "left")
    both = compose(zoo.registry, [a.ref, b.ref, c.ref], name="both", scales=[0.5, 1.0, 1.0])
    base, ta, tb, tc, composed = (zoo.tensors(v.ref) for v in (circles, a, b, c, both))
    for name, W in base.items():
        expected = W + 0.5 * (ta[name] - W) + (tb[name] - W) + (tc[name] - W)
        assert torch.allclose(composed[name], expected, atol=1e-6), name
    assert kind_of(zoo, both.ref, "synthesis.b8.conv0.weight") == FACTORED
    assert kind_of(zoo, both.ref, "synthesis.b4.conv1.weight") == FACTORED


@pytest.mark.parametrize("tokens, factored", [("last", True), ("last_and_following", False)])
def test_uce_change_is_factored_when_its_rank_is_below_half_the_smaller_side(zoo, sd_dir, tokens, factored):
    from modelzoo.editors.uce import UceRequest

    parent = zoo.import_(sd_dir, "sd")
    request = UceRequest(erase=("cat",), preserve=("bird",), tokens=tokens)
    result = get_editor("uce").edit(zoo.load(parent.ref), request)
    child = zoo.edit(parent.ref, "uce", request, name="sd-uce")
    kinds = {zoo.registry.manifest(child.ref)[("tensor", n)].kind for n in result.changed}
    assert kinds == ({FACTORED} if factored else {"tensor"})
    stored = zoo.tensors(child.ref, list(result.changed))
    for name, dense in result.changed.items():
        assert relative_error(stored[name], dense) < 1e-5, name
