"""Function vectors (Todd et al. 2024, "Function Vectors in Large Language Models", arXiv 2310.15213;
reference code ericwtodd/function_vectors).

A task is a list of (input, output) pairs shown in prompts `Q: x\\nA: y\\n\\n ... Q: x\\nA:`.

- a_lj: each attention head's mean output at the last token over `mean_trials` `shots`-shot prompts of the
  task; a head's output is its slice of the attention output projection's input (section 2.1).
- Causal indirect effect of head (l, j): on prompts whose shots have shuffled labels, replace that head's
  last-token output by a_lj and measure the rise in the probability of the query's answer (first token),
  averaged over `ie_trials` prompts (section 2.2, eq. 2).
- The function vector v_t = sum over the top `heads` heads of W_O^l[:, j] a_lj, the head's mean output
  through its layer's output projection (eq. 3).
- Added to the residual stream after block `layer` at the last token, v_t should make the model do the task
  on zero-shot prompts (`Q: x\\nA:`) and on shuffled-label prompts (section 3).

Patching touches only the last token, so each indirect-effect trial runs the prompt once to cache the
keys and values before the last token, then every head's patch as one row of a batched last-token pass.
Where `layers` or `head_counts` hold several candidates, the layer and head count are chosen by zero-shot
accuracy (then probability) on training queries; the test pairs only grade.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from modelzoo.analyses.base import AnalysisProgress, read_json_lines, report, shipped_names, shipped_or_path
from modelzoo.analyses.lm import LmParts, lm_parts, prefix, residual, run_rest, with_residual
from modelzoo.registry.analyses import NewAnalysis, data_hash
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.tracing import trace

PATCH_BATCH = 32  # heads patched per batched last-token pass
TASKS_DIR = Path(__file__).with_name("tasks")


def task_names() -> list[str]:
    return shipped_names(TASKS_DIR, ".jsonl")


def task_path(name_or_path: str) -> Path:
    """A task file, or the name of one shipped in analyses/tasks/ (capital, antonym, ...)."""
    return shipped_or_path(name_or_path, TASKS_DIR, ".jsonl")


@dataclass(frozen=True)
class Pair:
    input: str
    output: str


def read_pairs(path: Path) -> list[Pair]:
    pairs = []
    for i, row in enumerate(read_json_lines(path)):
        where = f"{path}:{i + 1}"
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("input", "output")):
            raise BadInput(f'{where}: a task line is {{"input": "...", "output": "..."}} with non-empty strings')
        pairs.append(Pair(row["input"].strip(), row["output"].strip()))
    if not pairs:
        raise BadInput(f"{path} holds no task pairs")
    return pairs


def prompt(shots: Sequence[Pair], query: str) -> str:
    return "".join(f"Q: {p.input}\nA: {p.output}\n\n" for p in shots) + f"Q: {query}\nA:"


@dataclass(frozen=True)
class FvRequest:
    task: tuple[Pair, ...]
    test: tuple[Pair, ...] = ()  # empty: the last `holdout` share of the task's pairs
    shots: int = 10
    heads: int = 10
    layer: int | None = None  # None: a third of the depth, unless `layers` offers candidates
    layers: tuple[int, ...] | None = None
    head_counts: tuple[int, ...] | None = None
    mean_trials: int = 50
    ie_trials: int = 25
    select_queries: int = 20
    holdout: float = 0.3
    seed: int = 0

    def split(self) -> tuple[list[Pair], list[Pair]]:
        if self.test:
            train, test = list(self.task), list(self.test)
        else:
            cut = len(self.task) - max(1, round(len(self.task) * self.holdout))
            train, test = list(self.task[:cut]), list(self.task[cut:])
        if self.shots < 1 or self.heads < 1 or self.mean_trials < 1 or self.ie_trials < 1:
            raise BadInput("--shots, --heads and the trial counts must be at least 1")
        if len(train) < self.shots + 1:
            raise BadInput(f"{self.shots}-shot prompts need at least {self.shots + 1} training pairs; the task "
                           f"leaves {len(train)} after holding out {len(test)} for testing")
        if not test:
            raise BadInput("no test pairs: give --test or more task pairs")
        return train, test


@dataclass(frozen=True)
class Trial:
    ids: list[int]
    answer: int


class Sampler:
    """Draws the task's prompts: `shots` training pairs, optionally with shuffled labels, then a query."""

    def __init__(self, parts: LmParts, train: Sequence[Pair], shots: int, seed: int):
        self.parts, self.train, self.shots, self.rng = parts, list(train), shots, random.Random(seed)

    def trial(self, query: Pair | None = None, shuffled: bool = False) -> Trial:
        pool = [p for p in self.train if p != query]
        chosen = self.rng.sample(pool, self.shots + (query is None))
        query = query or chosen.pop()
        if shuffled:
            outputs = [p.output for p in chosen]
            self.rng.shuffle(outputs)
            chosen = [Pair(p.input, o) for p, o in zip(chosen, outputs, strict=True)]
        return Trial(self.parts.ids(prompt(chosen, query.input)), self.parts.answer_token(query.output))


def zero_shot_trials(parts: LmParts, pairs: Sequence[Pair]) -> list[Trial]:
    return [Trial(parts.ids(prompt([], p.input)), parts.answer_token(p.output)) for p in pairs]


@torch.no_grad()
def mean_head_outputs(parts: LmParts, trials: Sequence[Trial]) -> tuple[Tensor, float]:
    """(a, accuracy): a[l, j] is head j of layer l's mean output at the last token; accuracy is the
    model's top-1 on the trials' answers."""
    names = [parts.attn_out(layer) for layer in range(parts.n_layers)]
    total = torch.zeros(parts.n_layers, parts.hidden)
    hits = 0
    for t in trials:
        with trace(parts.lm, names, retain_input=True, retain_output=False) as traces:
            logits = parts.lm(torch.tensor([t.ids], device=parts.lm.device)).logits
        hits += int(logits[0, -1].argmax()) == t.answer
        total += torch.stack([traces[n].input[0, -1].float().cpu() for n in names])
    return (total / len(trials)).reshape(parts.n_layers, parts.n_heads, parts.head_dim), hits / len(trials)


def patch_heads(parts: LmParts, a: Tensor, rows: Sequence[tuple[int, int]]) -> Any:
    """An input editor for the output projections: batch row r gets head rows[r] = (layer, head) replaced
    by its mean a[layer, head] at the last token; every other slice flows unchanged."""
    by_name: dict[str, list[tuple[int, int, int]]] = {}
    for r, (layer, head) in enumerate(rows):
        by_name.setdefault(parts.attn_out(layer), []).append((r, layer, head))
    d = parts.head_dim

    def edit(name: str, x: Tensor) -> Tensor:
        if name not in by_name:
            return x
        x = x.clone()
        for r, layer, head in by_name[name]:
            x[r, -1, head * d:(head + 1) * d] = a[layer, head].to(x)
        return x

    return edit


@torch.no_grad()
def indirect_effects(parts: LmParts, a: Tensor, trials: Sequence[Trial],
                     progress: AnalysisProgress | None = None) -> Tensor:
    """Mean over trials of P(answer | head patched with its mean) - P(answer), for every (layer, head)."""
    heads = [(layer, head) for layer in range(parts.n_layers) for head in range(parts.n_heads)]
    names = [parts.attn_out(layer) for layer in range(parts.n_layers)]
    effect = torch.zeros(len(heads))
    for i, t in enumerate(trials):
        report(progress, "indirect effects", i, len(trials))
        pre = prefix(parts, t.ids, len(t.ids) - 1)
        clean = run_rest(parts, pre).logits[0, -1].float().softmax(-1)[t.answer]
        for start in range(0, len(heads), PATCH_BATCH):
            rows = heads[start:start + PATCH_BATCH]
            with trace(parts.lm, names, edit_input=patch_heads(parts, a, rows), retain_output=False):
                logits = run_rest(parts, pre, len(rows)).logits[:, -1].float()
            effect[start:start + len(rows)] += logits.softmax(-1)[:, t.answer].cpu() - float(clean)
    return (effect / len(trials)).reshape(parts.n_layers, parts.n_heads)


def top_heads(effect: Tensor, k: int) -> list[tuple[int, int]]:
    flat = effect.flatten().topk(min(k, effect.numel())).indices
    return [(int(i) // effect.shape[1], int(i) % effect.shape[1]) for i in flat]


@torch.no_grad()
def function_vector(parts: LmParts, a: Tensor, heads: Sequence[tuple[int, int]]) -> Tensor:
    """sum over heads of W_O[:, head's slice] a[layer, head]: each mean output in the residual stream."""
    d = parts.head_dim
    v = torch.zeros(parts.hidden)
    for layer, head in heads:
        W_O = parts.out_weight(layer).float().cpu()
        v += W_O[:, head * d:(head + 1) * d] @ a[layer, head].float()
    return v


def added_at_last_token(vector: Tensor) -> Callable[[str, Any], Any]:
    """An output editor for a block: `vector` added to its residual output at the last token."""
    def add(name: str, output: Any) -> Any:
        hidden = residual(output).clone()
        hidden[:, -1] += vector.to(hidden)
        return with_residual(output, hidden)

    return add


@torch.no_grad()
def answer_scores(parts: LmParts, trials: Sequence[Trial], layer: int | None = None,
                  vector: Tensor | None = None) -> tuple[float, float]:
    """(top-1 accuracy, mean probability) of the trials' answers, with `vector` added to the residual
    after block `layer` at the last token when given."""
    hits, p = 0, 0.0
    for t in trials:
        ids = torch.tensor([t.ids], device=parts.lm.device)
        if vector is None or layer is None:
            logits = parts.lm(ids).logits
        else:
            with trace(parts.lm, parts.block(layer), edit_output=added_at_last_token(vector), retain_output=False):
                logits = parts.lm(ids).logits
        probs = logits[0, -1].float().softmax(-1)
        hits += int(probs.argmax()) == t.answer
        p += float(probs[t.answer])
    return hits / len(trials), p / len(trials)


class FvAnalyzer:
    kind: ClassVar[str] = "fv"
    families: ClassVar[tuple[str, ...]] = ("lm",)

    def check(self, request: FvRequest) -> None:
        request.split()

    def analyze(self, model: LoadedModel, request: FvRequest, progress: AnalysisProgress | None = None) -> NewAnalysis:
        train, test = request.split()
        parts = lm_parts(model)
        n = parts.n_layers
        layers = [request.layer] if request.layer is not None else list(request.layers or [n // 3])
        counts = sorted(set(request.head_counts or [request.heads]))
        if any(not 0 <= layer < n for layer in layers) or any(k < 1 for k in counts):
            raise BadInput(f"layers must lie in 0..{n - 1} and head counts be at least 1")
        sampler = Sampler(parts, train, request.shots, request.seed)

        report(progress, "mean head outputs", 0, 1)
        a, icl_train = mean_head_outputs(parts, [sampler.trial() for _ in range(request.mean_trials)])
        effect = indirect_effects(parts, a, [sampler.trial(shuffled=True) for _ in range(request.ie_trials)], progress)
        ranked = top_heads(effect, max(counts))

        select = zero_shot_trials(parts, train[: request.select_queries])
        curves: dict[str, dict[str, list[float]]] = {}
        best: tuple[float, float, int, int] | None = None
        for layer in layers:
            curves[str(layer)] = {}
            for k in counts:
                report(progress, "choosing layer and heads", len(curves), len(layers))
                acc, p = answer_scores(parts, select, layer, function_vector(parts, a, ranked[:k]))
                curves[str(layer)][str(k)] = [acc, p]
                if best is None or (acc, p) > best[:2]:
                    best = (acc, p, layer, k)
        assert best is not None
        _, _, layer, k = best
        heads = ranked[:k]
        v = function_vector(parts, a, heads)

        report(progress, "testing", 0, 1)
        zero_test = zero_shot_trials(parts, test)
        shuffled = [sampler.trial(query=p, shuffled=True) for p in test]
        icl, _ = answer_scores(parts, [sampler.trial(query=p) for p in test])
        base_zero, base_p = answer_scores(parts, zero_test)
        fv_zero, fv_p = answer_scores(parts, zero_test, layer, v)
        base_shuffled, _ = answer_scores(parts, shuffled)
        fv_shuffled, _ = answer_scores(parts, shuffled, layer, v)
        metrics = {
            "layer": layer,
            "heads": [list(h) for h in heads],
            "zero_shot": {"base": base_zero, "fv": fv_zero},
            "zero_shot_p": {"base": base_p, "fv": fv_p},
            "shuffled": {"base": base_shuffled, "fv": fv_shuffled},
            "icl": icl,
            "icl_train": icl_train,
            "tested": len(test),
            "fv_norm": float(v.norm()),
            "indirect_effect_top": [round(float(effect[h]), 5) for h in heads],
            "selection": {"queries": len(select), "accuracy_p_by_layer_and_heads": curves},
        }
        params = {"shots": request.shots, "heads": request.heads, "layer": request.layer, "layers": layers,
                  "head_counts": counts, "mean_trials": request.mean_trials, "ie_trials": request.ie_trials,
                  "select_queries": request.select_queries, "holdout": request.holdout, "seed": request.seed,
                  "train": len(train), "test": len(test), "template": "Q: {input}\\nA: {output}\\n\\n"}
        data = {"task": [p.__dict__ for p in train], "test": [p.__dict__ for p in test]}
        return NewAnalysis(kind=self.kind, params=params, metrics=metrics, input_hash=data_hash(data),
                           tensors={"function_vector": v, "mean_head_outputs": a.contiguous(),
                                    "indirect_effect": effect.contiguous()})
