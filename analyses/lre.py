"""Linear relational embeddings (Hernandez et al. 2023, "Linearity of Relation Decoding in Transformer
Language Models", arXiv 2308.09124; reference code evandez/relations).

For a relation r (country -> capital), the LM's decoding of the object from the subject's hidden state h
(the residual stream after block `layer`, at the subject's last token) is close to an affine map

    LRE(h) = beta W h + b,   W = E[dz/dh],   b = E[z - W h]

where z is the last block's output at the prompt's last token, and the expectations are over `train`
facts, each in an in-context prompt that lists the other training facts (section 3). The paper's measures:

- faithfulness: how often decode(LRE(h)) has the same top-1 token as the LM itself (section 4.1);
- causality: how often adding  dh = W_k^+ (z' - z)  to h at the subject, where W_k^+ is W's rank-k
  pseudo-inverse and z, z' the LM's z for the subject and for another subject s' with object o', makes the
  LM answer o' (section 4.2).

Only facts the LM answers correctly count. beta and the layer are chosen on the training facts by
leave-one-out faithfulness (W and b of the other training facts), the rank by causality among the
training facts; the test facts only grade.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from modelzoo.analyses.base import AnalysisProgress, read_json_lines, report
from modelzoo.analyses.lm import LmParts, Prefix, lm_parts, prefix, residual, run_rest, with_residual
from modelzoo.registry.analyses import NewAnalysis, data_hash
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.tracing import trace

BETAS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
RANKS = (8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Fact:
    relation: str
    prompt: str  # "{}" marks the subject
    subject: str
    object: str

    @property
    def text(self) -> str:
        return self.prompt.format(self.subject)


def fact_from_json(row: Any, where: str) -> Fact:
    """A fact line: {"relation", "prompt", "subject", "object"}, or a MEMIT request (target_true)."""
    if not isinstance(row, dict):
        raise BadInput(f"{where}: a fact is a JSON object, not {type(row).__name__}")
    obj = row.get("object", row.get("target_true"))
    fields = {"relation": row.get("relation", ""), "prompt": row.get("prompt"), "subject": row.get("subject"),
              "object": obj}
    for key, value in fields.items():
        if not isinstance(value, str) or (key != "relation" and not value.strip()):
            raise BadInput(f"{where}: {key!r} must be a non-empty string (MEMIT requests give target_true)")
    prompt = fields["prompt"]
    if prompt.count("{}") != 1 or "{" in prompt.replace("{}", "") or "}" in prompt.replace("{}", ""):
        raise BadInput(f"{where}: the prompt {prompt!r} needs exactly one {{}} where the subject goes")
    return Fact(**fields)  # type: ignore[arg-type]


def read_facts(path: Path) -> list[Fact]:
    rows = read_json_lines(path)
    facts = [fact_from_json(row, f"{path}:{i + 1}") for i, row in enumerate(rows)]
    if not facts:
        raise BadInput(f"{path} holds no facts")
    return facts


@dataclass(frozen=True)
class LreRequest:
    facts: tuple[Fact, ...]
    relation: str | None = None  # needed when the facts hold several relations
    layer: int | None = None  # None: swept over `layers`
    layers: tuple[int, ...] | None = None  # None: every n_layers // 6 from 1 up to two thirds of the depth
    train: int = 8
    betas: tuple[float, ...] = BETAS
    ranks: tuple[int, ...] = RANKS

    def chosen_facts(self) -> tuple[str, list[Fact]]:
        relations = sorted({f.relation for f in self.facts})
        relation = self.relation
        if relation is None:
            if len(relations) != 1:
                raise BadInput(f"the facts hold relations {relations}; pick one with --relation")
            relation = relations[0]
        facts = [f for f in self.facts if f.relation == relation]
        if self.train < 2:
            raise BadInput(f"--train must be at least 2 (W is a mean over training facts), got {self.train}")
        if len(facts) < self.train + 1:
            raise BadInput(f"relation {relation!r} has {len(facts)} facts; fitting on {self.train} and testing "
                           f"on at least one needs {self.train + 1}")
        if not self.betas or any(b <= 0 for b in self.betas) or not self.ranks or any(k < 1 for k in self.ranks):
            raise BadInput("betas must be positive and ranks at least 1")
        return relation, facts


def icl_examples(examples: Iterable[Fact], fact: Fact) -> str:
    """The other examples' filled prompts with their objects, one a line: what precedes the fact's prompt."""
    return "".join(f"{e.text} {e.object}\n" for e in examples if e.subject != fact.subject)


def icl_prompt(examples: Iterable[Fact], fact: Fact) -> str:
    return icl_examples(examples, fact) + fact.text


@dataclass(frozen=True)
class Encoded:
    """A fact in its in-context prompt: ids, the subject's last token, and the LM's own answer."""

    fact: Fact
    ids: list[int]
    subject_at: int
    answer: int  # the LM's top-1 next token
    target: int  # the object's first token
    h: dict[int, Tensor]  # layer -> residual after that block at the subject's last token
    z: Tensor  # the last block's output at the last token
    examples: Prefix | None  # the cache of the in-context examples, which other prompts share

    @property
    def known(self) -> bool:
        return self.answer == self.target


def subject_end(parts: LmParts, text: str, subject: str) -> int:
    """Index of the subject's last token: the tokens of the text up to the subject's last occurrence."""
    end = text.rindex(subject) + len(subject)
    return len(parts.ids(text[:end])) - 1


@torch.no_grad()
def encode(parts: LmParts, fact: Fact, examples: Sequence[Fact], layers: Sequence[int],
           shared: Prefix | None = None) -> Encoded:
    """The fact in its in-context prompt; `shared` (the examples' cache, see `examples_prefix`) spares
    running the examples again."""
    text = icl_prompt(examples, fact)
    ids = parts.ids(text)
    at = subject_end(parts, text, fact.subject)
    names = [parts.block(layer) for layer in layers] + [parts.block(parts.n_layers - 1)]
    with trace(parts.lm, names) as traces:
        logits = run_rest(parts, prefix(parts, ids, at, shared)).logits
    h = {layer: residual(traces[parts.block(layer)].output)[0, 0].float() for layer in layers}
    z = residual(traces[parts.block(parts.n_layers - 1)].output)[0, -1].float()
    return Encoded(fact, ids, at, int(logits[0, -1].argmax()), parts.answer_token(fact.object), h, z, shared)


def examples_prefix(parts: LmParts, examples: Sequence[Fact], fact: Fact) -> Prefix:
    ids = parts.ids(icl_examples(examples, fact))
    return prefix(parts, ids, len(ids))


def jacobians(parts: LmParts, ids: Sequence[int], subject_at: int, layers: Sequence[int],
              shared: Prefix | None = None) -> tuple[dict[int, Tensor], dict[int, Tensor], Tensor]:
    """(J, h, z): for each layer, the Jacobian dz/dh of the last block's output z at the last token with
    respect to the residual h after that block at position `subject_at`, with h itself; and z.

    One pass serves every layer: a zero offset, the differentiation variable, joins the residual after each
    layer's block at the subject, so dz/d(offset) is dz/dh with everything downstream recomputed, and one
    backward pass, batched over the hidden-size basis of z, gives all the Jacobians. Only the tokens from
    the subject on are recomputed; the prefix before it is a fixed key/value cache (`shared`'s where the
    prompt begins with its tokens)."""
    pre = prefix(parts, ids, subject_at, shared)
    by_name = {parts.block(layer): layer for layer in layers}
    last = parts.block(parts.n_layers - 1)
    param = next(parts.lm.parameters())
    offsets = {layer: torch.zeros(parts.hidden, dtype=param.dtype, device=param.device, requires_grad=True)
               for layer in layers}
    h: dict[int, Tensor] = {}

    def offset(name: str, output: Any) -> Any:
        if name not in by_name:
            return output
        layer = by_name[name]
        hidden = residual(output).clone()
        h[layer] = hidden[0, 0].detach().float()
        hidden[0, 0] = hidden[0, 0] + offsets[layer]
        return with_residual(output, hidden)

    with torch.enable_grad():
        with trace(parts.lm, [*by_name, last], edit_output=offset, detach=False, stop=True) as traces:
            run_rest(parts, pre)
        z = residual(traces[last].output)[0, -1]
        basis = torch.eye(parts.hidden, dtype=z.dtype, device=z.device)
        grads = torch.autograd.grad(z, [offsets[layer] for layer in layers], basis, is_grads_batched=True)
    J = {layer: g.float() for layer, g in zip(layers, grads, strict=True)}
    return J, h, z.detach().float()


@torch.no_grad()
def _decoded(parts: LmParts, Z: Tensor, answers: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(hits, log p): for each row z of Z, whether the head's top-1 token is the answer, and its log-probability."""
    logits = parts.decode(Z.to(parts.lm.dtype)).float()
    target = torch.tensor(list(answers), device=logits.device)
    hits = logits.argmax(-1) == target
    return hits.cpu(), logits.log_softmax(-1).gather(-1, target[:, None])[:, 0].cpu()


@torch.no_grad()
def _edited_answers(parts: LmParts, enc: Encoded, layer: int, deltas: Tensor) -> list[int]:
    """The LM's top-1 answers with each row of `deltas` added to the residual after `layer` at the subject
    (one batch row each, over the prompt's prefix cache)."""
    pre = prefix(parts, enc.ids, enc.subject_at, enc.examples)

    def add(name: str, output: Any) -> Any:
        hidden = residual(output).clone()
        hidden[:, 0] += deltas.to(hidden)
        return with_residual(output, hidden)

    with trace(parts.lm, parts.block(layer), edit_output=add, retain_output=False):
        logits = run_rest(parts, pre, len(deltas)).logits
    return [int(t) for t in logits[:, -1].argmax(-1)]


def pinv_rank(W: Tensor, rank: int) -> Tensor:
    """W's rank-k pseudo-inverse V_k S_k^-1 U_k^T."""
    U, S, Vh = torch.linalg.svd(W.double())
    k = min(rank, int((S[0] * 1e-7 < S).sum()))  # directions W does not collapse
    return (Vh[:k].T @ torch.diag(1 / S[:k]) @ U[:, :k].T).float()


def _pairs(encs: Sequence[Encoded]) -> list[tuple[Encoded, Encoded]]:
    """Each fact with the next one (cyclically) whose answer differs: the causality trials."""
    pairs = []
    for i, enc in enumerate(encs):
        for other in encs[i + 1:] + encs[:i]:
            if other.target != enc.target:
                pairs.append((enc, other))
                break
    return pairs


def _share(hits: Sequence[bool]) -> float:
    return sum(hits) / len(hits) if hits else 0.0


def _causality(parts: LmParts, pairs: Sequence[tuple[Encoded, Encoded]], layer: int,
               W_pinvs: Sequence[Tensor]) -> list[float]:
    """For each pseudo-inverse, the share of pairs (a, b) where adding W^+ (z_b - z_a) at a's subject makes
    the LM answer b's object."""
    hits: list[list[bool]] = [[] for _ in W_pinvs]
    for a, b in pairs:
        deltas = torch.stack([P @ (b.z - a.z) for P in W_pinvs])
        for k, answer in enumerate(_edited_answers(parts, a, layer, deltas)):
            hits[k].append(answer == b.target)
    return [_share(h) for h in hits]


class LreAnalyzer:
    kind: ClassVar[str] = "lre"
    families: ClassVar[tuple[str, ...]] = ("lm",)

    def check(self, request: LreRequest) -> None:
        request.chosen_facts()

    def analyze(self, model: LoadedModel, request: LreRequest, progress: AnalysisProgress | None = None) -> NewAnalysis:
        relation, facts = request.chosen_facts()
        parts = lm_parts(model)
        n = parts.n_layers
        if request.layer is not None:
            layers = [request.layer]
        else:
            layers = list(request.layers or range(1, max(2, 2 * n // 3), max(1, n // 6)))
        bad = [layer for layer in layers if not 0 <= layer < n - 1]
        if bad:
            raise BadInput(f"layers {bad} are out of range: {model.ref} has blocks 0..{n - 1}, and h must come "
                           f"before the last one")

        # Most prompts share their in-context examples, which run once; a test fact's prompt of the
        # training facts is often the one it was first checked in.
        shared: dict[str, Prefix] = {}
        seen: dict[str, Encoded] = {}

        def encoded_in(fact: Fact, examples: Sequence[Fact]) -> Encoded:
            text, head = icl_prompt(examples, fact), icl_examples(examples, fact)
            if head not in shared:
                shared[head] = examples_prefix(parts, examples, fact)
            if text not in seen:
                seen[text] = encode(parts, fact, examples, layers, shared[head])
            return seen[text]

        # Which facts the LM knows: each in a prompt of the first `train` other facts.
        encoded = []
        for i, fact in enumerate(facts):
            report(progress, "known facts", i, len(facts))
            encoded.append(encoded_in(fact, [f for f in facts if f is not fact][: request.train]))
        known = [e for e in encoded if e.known]
        if len(known) < request.train + 1:
            raise BadInput(f"{model.ref} answers {len(known)} of the {len(facts)} {relation!r} facts correctly; "
                           f"fitting on {request.train} and testing on one needs {request.train + 1}")
        train_facts = [e.fact for e in known[: request.train]]
        train = [encoded_in(e.fact, train_facts) for e in known[: request.train]]
        test = [encoded_in(e.fact, train_facts) for e in known[request.train:]]
        test = [e for e in test if e.known]

        jac: dict[int, list[Tensor]] = {layer: [] for layer in layers}
        for i, enc in enumerate(train):
            report(progress, "jacobians", i, len(train))
            for layer, J in jacobians(parts, enc.ids, enc.subject_at, layers, enc.examples)[0].items():
                jac[layer].append(J)

        # beta and layer: leave-one-out faithfulness on the training facts; a few training facts often
        # tie at 1.0, so ties go to the higher mean log-probability of the LM's answer
        sweep: dict[str, dict[str, float]] = {}
        best = (-1.0, -float("inf"), layers[0], request.betas[0])
        for layer in layers:
            Js = torch.stack(jac[layer])
            bs = torch.stack([e.z - J @ e.h[layer] for e, J in zip(train, jac[layer], strict=True)])
            n_train = len(train)
            W_loo = (Js.sum(0) - Js) / (n_train - 1)  # fact i's W and b from the other training facts
            b_loo = (bs.sum(0) - bs) / (n_train - 1)
            Wh = torch.stack([W_loo[i] @ e.h[layer] for i, e in enumerate(train)])
            answers = [e.answer for e in train]
            sweep[str(layer)] = {}
            for beta in request.betas:
                hit, log_p = _decoded(parts, beta * Wh + b_loo, answers)
                score = float(hit.float().mean())
                sweep[str(layer)][str(beta)] = score
                if (score, float(log_p.mean())) > best[:2]:
                    best = (score, float(log_p.mean()), layer, beta)
        _, _, layer, beta = best
        W = torch.stack(jac[layer]).mean(0)
        b = torch.stack([e.z - W @ e.h[layer] for e in train]).mean(0)

        # rank: causality among the training facts
        ranks = sorted({min(k, parts.hidden) for k in request.ranks})
        train_pairs = _pairs(train)
        rank_sweep = dict(zip(map(str, ranks), _causality(parts, train_pairs, layer, [pinv_rank(W, k) for k in ranks]),
                              strict=True))
        rank = max(ranks, key=lambda k: (rank_sweep[str(k)], -k))

        report(progress, "testing", 0, 1)
        shift = torch.stack([e.z - e.h[layer] for e in train]).mean(0)
        H = torch.stack([e.h[layer] for e in test]) if test else torch.zeros(0, parts.hidden)
        answers = [e.answer for e in test]
        faithful, identity, translation = (_share(_decoded(parts, Z, answers)[0].tolist())
                                           for Z in (beta * H @ W.T + b, H, H + shift))
        test_pairs = _pairs(test)
        causality = _causality(parts, test_pairs, layer, [pinv_rank(W, rank)])[0]
        metrics = {
            "relation": relation,
            "layer": layer,
            "beta": beta,
            "rank": rank,
            "faithfulness": faithful,
            "causality": causality,
            "tested": len(test),
            "causality_tested": len(test_pairs),
            "baselines": {"identity": identity, "translation": translation},
            "known": len(known),
            "facts": len(facts),
            "train_subjects": [f.subject for f in train_facts],
            "sweep": {"faithfulness_loo": sweep, "causality_by_rank": rank_sweep},
        }
        params = {"relation": relation, "train": request.train, "layer": request.layer, "layers": layers,
                  "betas": list(request.betas), "ranks": ranks, "prompt": facts[0].prompt}
        return NewAnalysis(kind=self.kind, params=params, metrics=metrics,
                           input_hash=data_hash([f.__dict__ for f in facts]),
                           tensors={"W": W.contiguous(), "b": b.contiguous()})

