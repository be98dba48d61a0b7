"""The synthetic fact table and the small GPT-2 that memorises it: the table is deterministic and shaped
like CounterFact, a quick run learns a good share of it, and the saved folder is a plain transformers
model that the registry stores with its fact table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modelzoo
from modelzoo.demo.facts import RELATIONS, Fact, fact_table, facts_from_json, facts_to_json
from modelzoo.demo.meters import fact_meters
from modelzoo.demo.train_facts_lm import FACTS_FILE, paragraphs, train_facts_lm
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.lm import LanguageModelFamily

# The quick profile measured top1 0.59 (paraphrase 0.60) for seed 0; the first-token chance is about 0.1.
QUICK_TOP1_BAR = 0.35


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Fact], dict[str, Any]]:
    out = tmp_path_factory.mktemp("facts") / "facts-gpt2"
    facts = fact_table(0)
    steps: list[int] = []
    metrics = train_facts_lm(out, facts, seed=0, profile="quick", progress=lambda done, total, s: steps.append(done))
    assert steps == list(range(1, metrics["steps"] + 1))
    return out, facts, metrics


def test_fact_table_is_deterministic_and_large_enough():
    facts = fact_table(0)
    assert facts == fact_table(0) and facts != fact_table(1)
    assert len(facts) >= 200 and len({(f.subject, f.relation) for f in facts}) == len(facts)
    assert {f.relation for f in facts} == {r.id for r in RELATIONS} and len(RELATIONS) >= 3
    for relation in RELATIONS:
        targets = {f.target for f in facts if f.relation == relation.id}
        assert len(targets) >= 5 and targets <= set(relation.targets)
        assert relation.prompt != relation.paraphrase
    assert all(len(f.subject.split()) == 2 for f in facts)


def test_fact_table_round_trips_through_json():
    facts = fact_table(3)
    assert facts_from_json(facts_to_json(facts)) == facts
    with pytest.raises(BadInput, match="fact table"):
        facts_from_json('[{"subject": "x"}]')
    with pytest.raises(BadInput, match="subject goes"):
        Fact("Talven Osric", "city", "lives in", "Oslo", "{} has a home in")


def test_training_paragraphs_mix_facts_and_both_templates():
    facts = fact_table(0)
    texts = paragraphs(facts, np.random.default_rng(0), (3, 6))
    sample = [next(texts) for _ in range(100)]
    sentences = [s.rstrip(".") + "." for text in sample for s in text.split(". ")]
    assert all(3 <= len(text.split(". ")) <= 6 for text in sample)
    assert any(f.sentence(False) in sentences for f in facts) and any(f.sentence(True) in sentences for f in facts)


def test_quick_run_memorises_a_good_share_of_the_table(trained):
    _, _, metrics = trained
    assert metrics["top1"] >= QUICK_TOP1_BAR and metrics["paraphrase_top1"] >= QUICK_TOP1_BAR
    assert metrics["facts"] == 210 and metrics["seconds"] > 0


def test_saved_folder_loads_with_transformers_and_keeps_its_facts(trained):
    out, facts, metrics = trained
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert facts_from_json((out / FACTS_FILE).read_text()) == facts
    readings = fact_meters(model, tokenizer, [(f.rewrite_prompt, f.target) for f in facts])
    assert abs(np.mean([r.top1 for r in readings]) - metrics["top1"]) <= 0.02
    # Subjects are several tokens, and the same tokens at the start of a prompt as inside a paraphrase.
    for fact in facts[:30]:
        subject = tokenizer(fact.subject)["input_ids"]
        assert len(subject) >= 2
        assert tokenizer(fact.rewrite_prompt)["input_ids"][: len(subject)] == subject
        paraphrase = tokenizer(fact.paraphrase_prompt)["input_ids"]
        assert any(paraphrase[i : i + len(subject)] == subject for i in range(len(paraphrase)))


def test_registry_stores_the_fact_table_with_the_lm_version(trained, tmp_path):
    out, facts, _ = trained
    zoo = modelzoo.open(tmp_path / "zoo")
    info = zoo.import_(out, "facts-gpt2")
    assert info.family == "lm"
    stored = zoo.registry.load_files(info.ref)
    assert facts_from_json(stored[FACTS_FILE].decode()) == facts
    assert json.loads(stored["config.json"])["architectures"] == ["GPT2LMHeadModel"]
    loaded = LanguageModelFamily().load(zoo.registry, info.ref)
    reference = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = loaded.tokenizer([f.rewrite_prompt for f in facts[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.pipeline(**ids).logits, reference(**ids).logits)
