"""CounterFact's probability comparisons (`experiments/py/eval_utils_counterfact.py` in kmeng01/memit).

For each prompt the length-normalised NLL of the new and of the true target is computed;
efficacy = share of rewrite prompts with P(new) > P(true), paraphrase = the same on paraphrase prompts,
neighborhood = share of neighbourhood prompts whose own true answer stays more likely than the new
target. Each figure is averaged per request, then over requests; the score is their harmonic mean.

A neighbourhood prompt that is itself the rewrite prompt of a request in the same batch is left out
(counted in `neighbors_skipped`): that fact was changed on purpose, so keeping its old answer is not what
an edit should do. CounterFact's 10,000 cases rarely meet this; a fact set of a few hundred facts edited
100 at a time meets it for most neighbours, and counting them measured the other edits, not leakage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelzoo.editors.lm_requests import FactRequest, pad_batch, pad_id, target_ids
from modelzoo.registry.errors import BadInput


@dataclass(frozen=True)
class FactScores:
    efficacy: float
    paraphrase: float | None
    neighborhood: float | None
    score: float
    requests: int
    prompts: int
    neighbors_skipped: int


@torch.no_grad()
def target_nll(lm: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch: int = 64) -> list[float]:
    """Mean NLL per target token of each (prompt, target), the target tokenised with a leading space."""
    rows = [(list(tokenizer(p)["input_ids"]), target_ids(tokenizer, t)) for p, t in pairs]
    head = lm.get_output_embeddings()
    device = next(lm.parameters()).device
    out: list[float] = []
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        ids, mask = pad_batch([p + t for p, t in chunk], pad_id(tokenizer))
        hidden = lm.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        for i, (p, t) in enumerate(chunk):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(t))
            logp = torch.log_softmax(head(hidden[i, positions]).float(), -1)
            out.append(float(-logp[torch.arange(len(t)), torch.tensor(t)].mean()))
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def fact_scores(lm: nn.Module, tokenizer: Any, requests: Sequence[FactRequest], batch: int = 64) -> FactScores:
    if not requests:
        raise BadInput("no requests to evaluate")
    missing = [i + 1 for i, r in enumerate(requests) if r.target_true is None]
    if missing:
        raise BadInput(f"evaluation compares against target_true, which request(s) {missing[:5]} lack")
    # (request, kind, [(prompt, answer that should win), (prompt, answer that should lose)])
    pairs: list[tuple[str, str]] = []
    slots: list[tuple[int, str]] = []
    edited = {r.text for r in requests}
    skipped = 0
    for i, r in enumerate(requests):
        assert r.target_true is not None
        for prompt, kind in [(r.text, "efficacy"), *[(p, "paraphrase") for p in r.paraphrase_prompts]]:
            pairs += [(prompt, r.target_new), (prompt, r.target_true)]
            slots.append((i, kind))
        for n in r.neighborhood_prompts:
            if n.prompt in edited:
                skipped += 1
                continue
            pairs += [(n.prompt, n.target or r.target_true), (n.prompt, r.target_new)]
            slots.append((i, "neighborhood"))
    nll = target_nll(lm, tokenizer, pairs, batch)
    wins: dict[str, dict[int, list[bool]]] = {"efficacy": {}, "paraphrase": {}, "neighborhood": {}}
    for j, (i, kind) in enumerate(slots):
        wins[kind].setdefault(i, []).append(nll[2 * j] < nll[2 * j + 1])

    def share(kind: str) -> float | None:
        per = [sum(v) / len(v) for v in wins[kind].values()]
        return sum(per) / len(per) if per else None

    efficacy, paraphrase, neighborhood = share("efficacy"), share("paraphrase"), share("neighborhood")
    assert efficacy is not None
    present = [v for v in (efficacy, paraphrase, neighborhood) if v is not None]
    return FactScores(
        efficacy=round(efficacy, 4),
        paraphrase=None if paraphrase is None else round(paraphrase, 4),
        neighborhood=None if neighborhood is None else round(neighborhood, 4),
        score=round(harmonic_mean(present), 4),
        requests=len(requests),
        prompts=len(slots),
        neighbors_skipped=skipped,
    )
