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
