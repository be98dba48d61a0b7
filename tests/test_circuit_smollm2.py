"""The variable-lookup circuit of the real SmolLM2-135M and its knockout child (slow: about 6 minutes of
wall time on two busy CPU threads).

SmolLM2-135M looks variables up in context (`k=7, p=3. k=` after 4 solved examples: 1.00 on the shipped
file's prompts) but does not do the paper's arithmetic binding (`x=3, y=4. x+y=`, 2-shot, single digits:
below 0.5), so the acceptance bars are checked on lookup:
- the circuit is at most 10% of the 300 components (270 heads, 30 MLPs);
- mean-ablating it drops task accuracy by at least 0.3, and 5 random sets of as many other components by
  at most 0.1;
- the `--mode mean` knockout child, exported and loaded with transformers, drops by as much on prompts
  neither the analysis nor the settings saw.

The settings (lambda 0.1, 100 steps, lr 1e-2: the defaults) were chosen on the shipped lookup file (seed 0,
its first 60 pairs). Here the analysis runs on fresh pairs drawn with seed 1 (80 per desideratum, half held
out), and the child is graded on 100 prompts drawn with seed 2. Mean-ablating L0.mlp alone takes lookup
accuracy to 0.0 and L11.mlp alone to 0.3 (every other single component stays at 0.85 or above), so the
random baseline depends on whether its draw (seed 0) holds one of them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

import modelzoo
from modelzoo.analyses.circuit import CircuitRequest, parse_desiderata
from modelzoo.analyses.circuit_tasks import lookup
from modelzoo.editors.ablate import Knockout
from modelzoo.registry.families.gguf import smollm2_gguf_path

pytestmark = pytest.mark.slow


def _held_out(seed: int, n: int) -> list[tuple[str, str]]:
    """Base prompts and answers of fresh lookup pairs."""
    return [(p["base"], p["answer"]) for p in lookup(pairs=n, seed=seed)["desiderata"][0]["pairs"]]


def _accuracy(model, tokenizer, prompts: list[tuple[str, str]]) -> float:  # type: ignore[no-untyped-def]
    hits = 0
    for text, answer in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            top = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        hits += top == tokenizer(answer, add_special_tokens=False)["input_ids"][0]
    return hits / len(prompts)


def test_lookup_circuit_is_small_necessary_and_its_knockout_child_loses_the_task(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zoo = modelzoo.open(tmp_path / "zoo")
    ref = zoo.import_(smollm2_gguf_path(Path(tempfile.gettempdir()) / "modelzoo-smollm2"), "smol").ref
    desiderata = parse_desiderata(lookup(pairs=80, seed=1), "lookup seed 1")
    info = zoo.analyze(ref, "circuit", CircuitRequest(desiderata, "lookup seed 1", holdout=0.5))
    m = info.metrics
    print(json.dumps({k: m[k] for k in ("components", "component_count", "total_components", "task_accuracy",
                                        "ablated_accuracy", "random_ablated_accuracy", "random_ablated_accuracies",
                                        "desiderata_accuracy", "tested", "step_seconds")}))
    assert m["component_count"] <= 0.1 * m["total_components"]
    assert m["task_accuracy"] - m["ablated_accuracy"] >= 0.3
    assert m["task_accuracy"] - m["random_ablated_accuracy"] <= 0.1

    child = zoo.knock_out(ref, Knockout(info.id, "mean"))
    assert child.params["components"] == m["components"]
    zoo.export(ref, tmp_path / "parent")
    zoo.export(child.ref, tmp_path / "child")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "child")
    prompts = _held_out(seed=2, n=100)
    parent_accuracy = _accuracy(AutoModelForCausalLM.from_pretrained(tmp_path / "parent").eval(), tokenizer, prompts)
    child_accuracy = _accuracy(AutoModelForCausalLM.from_pretrained(tmp_path / "child").eval(), tokenizer, prompts)
    print(json.dumps({"held_out": len(prompts), "parent": parent_accuracy, "child": child_accuracy}))
    assert parent_accuracy - child_accuracy >= 0.3
    assert abs((parent_accuracy - child_accuracy) - (m["task_accuracy"] - m["ablated_accuracy"])) <= 0.15
