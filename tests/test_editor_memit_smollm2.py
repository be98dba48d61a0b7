"""MEMIT and AlphaEdit on the real SmolLM2-135M (slow: about 12 minutes for the three runs on 2 threads;
statistics are cached between them). Measured: 10 edits 1.00 / 0.93, 100 edits 0.91 / 0.81 (efficacy /
neighbourhood), on neighbours the batch does not itself rewrite (see editors/lm_eval.py). The thresholds
are the issue's goals and sit one fact under the 100-edit figures: lam 4,000 is the edge of the trade-off
(benchmarks/editors_lm.py), so a change of z, C or lam shows here first."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from modelzoo.demo.real_facts import DEFAULT_FILE, load
from modelzoo.editors.lm_eval import fact_scores
from modelzoo.editors.lm_requests import request_from_json
from modelzoo.editors.memit import MemitRequest
from modelzoo.registry.families.gguf import smollm2_gguf_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    import modelzoo

    zoo = modelzoo.open(tmp_path_factory.mktemp("smol") / "zoo")
    info = zoo.import_(smollm2_gguf_path(Path(tempfile.gettempdir()) / "modelzoo-smollm2"), "smol")
    return zoo, info


def _edit_and_score(zoo, info, method: str, n: int):  # type: ignore[no-untyped-def]
    facts = [request_from_json(r) for r in load(DEFAULT_FILE)[:n]]
    request = MemitRequest(requests=tuple(facts))
    started = time.perf_counter()
    child = zoo.edit(info.ref, method, request)
    model = zoo.load(child.ref)
    scores = fact_scores(model.pipeline, model.tokenizer, facts)
    seconds = round(time.perf_counter() - started)
    print(json.dumps({"method": method, "edits": n, **scores.__dict__, "seconds": seconds}))
    return child, scores


@pytest.mark.parametrize("n, efficacy, neighborhood", [(10, 0.95, 0.90), (100, 0.90, 0.80)])
def test_memit_writes_counterfactuals_into_smollm2_and_keeps_neighbours(smol, n, efficacy, neighborhood):
    zoo, info = smol
    child, scores = _edit_and_score(zoo, info, "memit", n)
    assert scores.efficacy >= efficacy and scores.neighborhood is not None and scores.neighborhood >= neighborhood
    names = {c.tensor for c in zoo.diff(info.ref, child.ref).changed}
    assert names == {f"model.layers.{x}.mlp.down_proj.weight" for x in range(4, 9)}


def test_alphaedit_writes_ten_counterfactuals_into_smollm2(smol):
    zoo, info = smol
    _, scores = _edit_and_score(zoo, info, "alphaedit", 10)
    assert scores.efficacy >= 0.9 and scores.neighborhood is not None and scores.neighborhood >= 0.9
