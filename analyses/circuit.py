"""Desiderata-based component masks (Davies et al. 2023, "Discovering Variable Binding Circuitry with
Desiderata", arXiv 2307.03637; reference code Nix07/binding-circuit-discovery).

Components are every attention head (its slice of the attention output projection's input) and every
MLP output, at the last token. Each gets a mask m in [0, 1]; on a base prompt the patched activation is

    m * base + (1 - m) * source

with `source` the same component's activation on the pair's source (counterfactual) prompt. A desideratum
is a set of (base, source) pairs with the base's `answer` token and a `target` token; on the patched base
run ld = logit(target) - logit(answer), and ld_orig is its value without patching (m = 1).

- `change` (the paper's value dependence): patching should move the answer towards the target (the
  source's answer); loss = mean(ld_orig - ld).
- `keep` (operation invariance): patching should leave the binding alone; loss = mean((ld - ld_orig)^2).

Masks start at 1 and are clamped to [0, 1] before each step; steps alternate over the desiderata, each on
`weight * loss`, with the sparsity penalty lam * sum((1.001 - m)^0.5) joined to the `change` steps (the
reference's 5 * loss_V + lam * penalty, then loss_T; Adam, lr 1e-2, 100 steps). Rounded, the masks name the
circuit: the components with m < 0.5, the ones patching needs.

Only the last token is patched, so each pair batch keeps its base prompts' key/value cache before the last
token and every step reruns one token; only the answer's and target's logits are decoded.

The circuit is then tested on held-out pairs:
- desiderata accuracy: with the rounded mask, a `change` pair succeeds when the target is the top token,
  a `keep` pair when the answer still is;
- task accuracy: the held-out base prompts answered (top-1) as they are; ablated accuracy: the same with
  the circuit mean-ablated at every position (each component's output replaced by its mean over the
  training base prompts' positions after the first, which in many LMs is an attention sink with outsized
  activations). This is exactly what `zoo edit ablate --mode mean` bakes into weights. Random ablated
  accuracy: the mean over `random_sets` sets of as many components drawn from outside the circuit.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from modelzoo.analyses.base import AnalysisProgress, report, shipped_names, shipped_or_path
from modelzoo.analyses.lm import LmParts, lm_parts
from modelzoo.registry.analyses import NewAnalysis, data_hash
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.tracing import trace
from modelzoo.registry.untrusted import parse_json_object

DESIDERATA_DIR = Path(__file__).with_name("desiderata")
MAX_FILE_BYTES = 20 * 2**20
EVAL_BATCH = 32
Kind = Literal["change", "keep"]


# ---- desiderata files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPair:
    base: str
    source: str
    answer: str  # the base prompt's answer: exactly one token as it follows the prompt
    target: str  # the token whose logit is measured against the answer's (`change`: the source's answer)


@dataclass(frozen=True)
class Desideratum:
    name: str
    kind: Kind
    pairs: tuple[PromptPair, ...]
    weight: float = 1.0


def desiderata_names() -> list[str]:
    return shipped_names(DESIDERATA_DIR, ".json")


def desiderata_path(name_or_path: str) -> Path:
    """A desiderata file, or the name of one shipped in analyses/desiderata/ (lookup, arithmetic)."""
    return shipped_or_path(name_or_path, DESIDERATA_DIR, ".json")


def read_desiderata(path: Path) -> tuple[Desideratum, ...]:
    """The desiderata of a JSON file (format in the README); BadInput naming the file and the fault."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise BadInput(f"{path} is larger than {MAX_FILE_BYTES // 2**20} MiB")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"no desiderata file {path} (shipped: {', '.join(desiderata_names())})") from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    return parse_desiderata(parse_json_object(raw, str(path)), str(path))


def parse_desiderata(data: dict[str, Any], where: str) -> tuple[Desideratum, ...]:
    items = data.get("desiderata")
    if not isinstance(items, list) or not items:
        raise BadInput(f'{where}: expected {{"desiderata": [...]}} with at least one desideratum')
    found = []
    for i, item in enumerate(items):
        at = f"{where}: desiderata[{i}]"
        if not isinstance(item, dict):
            raise BadInput(f"{at} is not an object")
        name, kind, weight, pairs = item.get("name", f"d{i}"), item.get("kind"), item.get("weight", 1.0), \
            item.get("pairs")
        if not isinstance(name, str) or kind not in ("change", "keep"):
            raise BadInput(f'{at}: "kind" must be "change" or "keep" and "name" a string')
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
            raise BadInput(f'{at}: "weight" must be a positive number')
        if not isinstance(pairs, list) or len(pairs) < 2:
            raise BadInput(f'{at}: "pairs" must list at least 2 pairs')
        parsed = []
        for j, pair in enumerate(pairs):
            keys = ("base", "source", "answer", "target")
            if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) and pair[k] for k in keys):
                raise BadInput(f"{at}.pairs[{j}]: a pair is an object with non-empty strings {', '.join(keys)}")
            parsed.append(PromptPair(*(pair[k] for k in keys)))
        found.append(Desideratum(name, kind, tuple(parsed), float(weight)))
    if not any(d.kind == "change" for d in found):
        raise BadInput(f'{where}: at least one desideratum must be of kind "change" (the sparsity penalty '
                       "rides on its steps)")
    return tuple(found)


# ---- components --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    layer: int
    head: int | None  # None: the layer's MLP

    @property
    def name(self) -> str:
        return f"L{self.layer}.mlp" if self.head is None else f"L{self.layer}.H{self.head}"


def components(parts: LmParts) -> list[Component]:
    """Each layer's heads, then its MLP: the order of the mask."""
    return [Component(layer, head) for layer in range(parts.n_layers)
            for head in [*range(parts.n_heads), None]]


def parse_component(name: str) -> Component:
    layer, _, rest = name.partition(".")
    try:
        if not layer.startswith("L"):
            raise ValueError
        return Component(int(layer[1:]), None if rest == "mlp" else int(rest.removeprefix("H")))
    except ValueError:
        raise BadInput(f"{name!r} is not a component name such as L12.H3 or L7.mlp") from None


def mlp_name(parts: LmParts, layer: int) -> str:
    return f"{parts.block(layer)}.mlp"


def split_mask(parts: LmParts, m: Tensor) -> tuple[Tensor, Tensor]:
    """(heads' masks (layers, heads), MLPs' masks (layers,)) of a mask in `components` order."""
    grid = m.reshape(parts.n_layers, parts.n_heads + 1)
    return grid[:, :-1], grid[:, -1]


def mixer(parts: LmParts, keep: Tensor, heads: Tensor, mlps: Tensor) -> Callable[[str, Any], Any]:
    """An editor for the output projections' inputs and the MLPs' outputs over one-token passes: each
    component's activation becomes keep * itself + (1 - keep) * the given one (`heads`: (layers, batch,
    heads, head_dim), `mlps`: (layers, batch, hidden))."""
    keep_heads, keep_mlps = split_mask(parts, keep)
    layer_of = {parts.attn_out(layer): layer for layer in range(parts.n_layers)}
    layer_of |= {mlp_name(parts, layer): layer for layer in range(parts.n_layers)}

    def edit(name: str, x: Tensor) -> Tensor:
        layer = layer_of[name]
        if name == parts.attn_out(layer):
            shaped = x.reshape(*x.shape[:-1], parts.n_heads, parts.head_dim)
            k = keep_heads[layer].to(x)[:, None]
            return (k * shaped + (1 - k) * heads[layer][:, None].to(x)).reshape(x.shape)
        k = keep_mlps[layer].to(x)
        return k * x + (1 - k) * mlps[layer][:, None].to(x)

    return edit


def _names(parts: LmParts) -> tuple[list[str], list[str]]:
    return ([parts.attn_out(layer) for layer in range(parts.n_layers)],
            [mlp_name(parts, layer) for layer in range(parts.n_layers)])


# ---- pair batches: cached base prompts and the sources' last-token activations -----------------------


def token_of(parts: LmParts, text: str, what: str) -> int:
    ids = parts.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        shown = parts.tokenizer.convert_ids_to_tokens(ids)
        raise BadInput(f"{what} {text!r} is {len(ids)} tokens {shown}, not one; answers and targets must "
                       "be single tokens as they follow the prompt")
    return int(ids[0])


@dataclass
class PairBatch:
    """Pairs of one desideratum whose base prompts have one length."""

    kind: Kind
    cache: Any  # the base prompts' key/value cache before the last token
    last: Tensor  # (batch, 1) the base prompts' last tokens
    answer: Tensor  # (batch,)
    target: Tensor  # (batch,)
    heads: Tensor  # (layers, batch, heads, head_dim) the sources' last-token head outputs
    mlps: Tensor  # (layers, batch, hidden) the sources' last-token MLP outputs
    ld_orig: Tensor | None = None  # (batch,) unpatched logit(target) - logit(answer)

    def __len__(self) -> int:
        return int(self.answer.shape[0])


def by_length(prompts: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """Indices of the prompts in batches of at most `batch` prompts of one length."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    return [rows[start:start + batch] for rows in groups.values() for start in range(0, len(rows), batch)]


@torch.no_grad()
def last_token_activations(parts: LmParts, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Every head's and MLP's output at each prompt's last token: (layers, n, heads, head_dim) and
    (layers, n, hidden)."""
    attn, mlp = _names(parts)
    heads = torch.zeros(parts.n_layers, len(prompts), parts.hidden)
    mlps = torch.zeros(parts.n_layers, len(prompts), parts.hidden)
    for rows in by_length(prompts, EVAL_BATCH):
        with trace(parts.lm, [*attn, *mlp], retain_input=True) as traces:
            parts.lm.base_model(torch.tensor([list(prompts[i]) for i in rows], device=parts.lm.device))
        heads[:, rows] = torch.stack([traces[n].input[:, -1].float().cpu() for n in attn])
        mlps[:, rows] = torch.stack([traces[n].output[:, -1].float().cpu() for n in mlp])
    return heads.reshape(parts.n_layers, len(prompts), parts.n_heads, parts.head_dim), mlps


@torch.no_grad()
def pair_batches(parts: LmParts, d: Desideratum, pairs: Sequence[PromptPair], batch: int) -> list[PairBatch]:
    encoded = [(parts.ids(p.base), parts.ids(p.source), token_of(parts, p.answer, f"{d.name}: answer"),
                token_of(parts, p.target, f"{d.name}: target")) for p in pairs]
    for row in encoded:
        if len(row[0]) < 2:
            raise BadInput(f"{d.name}: a base prompt needs at least two tokens")
    batches = []
    for rows in by_length([row[0] for row in encoded], batch):
        chunk = [encoded[i] for i in rows]
        tokens = torch.tensor([r[0] for r in chunk], device=parts.lm.device)
        cache = parts.lm.base_model(tokens[:, :-1], use_cache=True).cache
        heads, mlps = last_token_activations(parts, [r[1] for r in chunk])
        batches.append(PairBatch(d.kind, cache, tokens[:, -1:], torch.tensor([r[2] for r in chunk]),
                                 torch.tensor([r[3] for r in chunk]), heads, mlps))
    return batches


def last_hidden(parts: LmParts, b: PairBatch, keep: Tensor) -> Tensor:
    """The final (normed) hidden state at the base prompts' last token, with the mask `keep` applied."""
    attn, mlp = _names(parts)
    with trace(parts.lm, attn, edit_input=mixer(parts, keep, b.heads, b.mlps), retain_input=False,
               retain_output=False), \
            trace(parts.lm, mlp, edit_output=mixer(parts, keep, b.heads, b.mlps), retain_output=False):
        out = parts.lm.base_model(b.last, cache=copy.deepcopy(b.cache), use_cache=True)
    return out.last_hidden_state[:, -1]


def logit_diff(parts: LmParts, b: PairBatch, keep: Tensor) -> Tensor:
    """logit(target) - logit(answer) on the patched base prompts, decoding only those two tokens."""
    h = last_hidden(parts, b, keep)
    W_U = parts.lm.get_output_embeddings().weight
    return ((W_U[b.target.to(W_U.device)] - W_U[b.answer.to(W_U.device)]).to(h) * h).sum(-1).float()


def desideratum_loss(b: PairBatch, ld: Tensor) -> Tensor:
    assert b.ld_orig is not None
    if b.kind == "change":
        return (b.ld_orig - ld).mean()
    return ((ld - b.ld_orig) ** 2).mean()


def sparsity(m: Tensor) -> Tensor:
    return ((1.001 - m) ** 0.5).sum()


# ---- training -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    mask: Tensor  # the continuous mask after training, in [0, 1]
    step_seconds: float  # mean wall time of one optimisation step (one desideratum's batches)


def train_mask(parts: LmParts, train: Sequence[tuple[Desideratum, list[PairBatch]]], lam: float, steps: int,
               lr: float, progress: AnalysisProgress | None = None, stage: str = "training") -> Trained:
    n = len(components(parts))
    m = torch.ones(n, requires_grad=True)
    optimizer = torch.optim.Adam([m], lr=lr)
    started = time.perf_counter()
    for step in range(steps):
        report(progress, stage, step, steps)
        for d, batches in train:
            optimizer.zero_grad()
            with torch.no_grad():
                m.clamp_(0, 1)
            loss = d.weight * sum(desideratum_loss(b, logit_diff(parts, b, m)) * len(b) for b in batches) \
                / sum(len(b) for b in batches)
            if d.kind == "change":
                loss = loss + lam * sparsity(m)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        m.clamp_(0, 1)
    return Trained(m.detach().clone(), (time.perf_counter() - started) / (steps * len(train)))


@torch.no_grad()
def desiderata_accuracy(parts: LmParts, tested: Sequence[PairBatch], keep: Tensor) -> float:
    """Share of held-out pairs whose patched top token is the target (`change`) or the answer (`keep`)."""
    W_U = parts.lm.get_output_embeddings()
    hits, total = 0, 0
    for b in tested:
        top = W_U(last_hidden(parts, b, keep)).argmax(-1).cpu()
        hits += int((top == (b.target if b.kind == "change" else b.answer)).sum())
        total += len(b)
    return hits / max(1, total)


# ---- mean ablation at every position ------------------------------------------------------------------


@torch.no_grad()
def mean_activations(parts: LmParts, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Each head's and MLP's mean output over the prompts' positions after the first:
    (layers, heads, head_dim) and (layers, hidden)."""
    attn, mlp = _names(parts)
    heads = torch.zeros(parts.n_layers, parts.hidden, dtype=torch.float64)
    mlps = torch.zeros(parts.n_layers, parts.hidden, dtype=torch.float64)
    count = 0
    for rows in by_length(prompts, EVAL_BATCH):
        with trace(parts.lm, [*attn, *mlp], retain_input=True) as traces:
            parts.lm.base_model(torch.tensor([list(prompts[i]) for i in rows], device=parts.lm.device))
        heads += torch.stack([traces[n].input[:, 1:].double().sum((0, 1)).cpu() for n in attn])
        mlps += torch.stack([traces[n].output[:, 1:].double().sum((0, 1)).cpu() for n in mlp])
        count += len(rows) * (len(prompts[rows[0]]) - 1)
    return (heads / count).float().reshape(parts.n_layers, parts.n_heads, parts.head_dim), (mlps / count).float()


def ablator(parts: LmParts, knocked: Sequence[Component], means: tuple[Tensor, Tensor]) -> Callable[[str, Any], Any]:
    """An editor that replaces the knocked-out components' outputs by their means at every position."""
    head_means, mlp_means = means
    by_name: dict[str, list[Component]] = {}
    for c in knocked:
        by_name.setdefault(parts.attn_out(c.layer) if c.head is not None else mlp_name(parts, c.layer), []).append(c)
    d = parts.head_dim

    def edit(name: str, x: Tensor) -> Tensor:
        if name not in by_name:
            return x
        x = x.clone()
        for c in by_name[name]:
            if c.head is None:
                x[...] = mlp_means[c.layer].to(x)
            else:
                x[..., c.head * d:(c.head + 1) * d] = head_means[c.layer, c.head].to(x)
        return x

    return edit


@torch.no_grad()
def task_accuracy(parts: LmParts, prompts: Sequence[tuple[list[int], int]], knocked: Sequence[Component] = (),
                  means: tuple[Tensor, Tensor] | None = None) -> float:
    """Top-1 accuracy of (prompt ids, answer) with `knocked` mean-ablated at every position."""
    attn, mlp = _names(parts)
    edit = ablator(parts, knocked, means) if knocked and means is not None else None
    hits = 0
    for rows in by_length([ids for ids, _ in prompts], EVAL_BATCH):
        tokens = torch.tensor([prompts[i][0] for i in rows], device=parts.lm.device)
        with trace(parts.lm, attn, edit_input=edit, retain_input=False, retain_output=False), \
                trace(parts.lm, mlp, edit_output=edit, retain_output=False):
            logits = parts.lm(tokens, logits_to_keep=1).logits[:, -1]
        hits += int((logits.argmax(-1).cpu() == torch.tensor([prompts[i][1] for i in rows])).sum())
    return hits / max(1, len(prompts))


# ---- the analysis -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CircuitRequest:
    desiderata: tuple[Desideratum, ...]
    source: str = "desiderata"  # the file's name or path, kept with the analysis
    lam: float = 0.1
    sweep: tuple[float, ...] = ()  # more lambdas: circuit size against desiderata accuracy
    steps: int = 100
    lr: float = 1e-2
    batch: int = 32  # base prompts per cached batch
    holdout: float = 0.5  # the last share of each desideratum's pairs, for testing only
    random_sets: int = 5
    seed: int = 0

    def split(self) -> list[tuple[Desideratum, list[PromptPair], list[PromptPair]]]:
        if self.steps < 1 or self.batch < 1 or self.random_sets < 1 or self.lr <= 0:
            raise BadInput("--steps, the batch and the random sets must be at least 1, the learning rate positive")
        if self.lam < 0 or any(lam < 0 for lam in self.sweep):
            raise BadInput("lambda must not be negative")
        if not 0 < self.holdout < 1:
            raise BadInput("the held-out share must lie strictly between 0 and 1")
        out = []
        for d in self.desiderata:
            cut = len(d.pairs) - max(1, round(len(d.pairs) * self.holdout))
            if cut < 1:
                raise BadInput(f"{d.name}: {len(d.pairs)} pairs leave none for training after holding out "
                               f"{self.holdout:.0%}")
            out.append((d, list(d.pairs[:cut]), list(d.pairs[cut:])))
        return out


class CircuitAnalyzer:
    kind: ClassVar[str] = "circuit"
    families: ClassVar[tuple[str, ...]] = ("lm",)

    def check(self, request: CircuitRequest) -> None:
        request.split()

    def analyze(self, model: LoadedModel, request: CircuitRequest,
                progress: AnalysisProgress | None = None) -> NewAnalysis:
        split = request.split()
        parts = lm_parts(model)
        for p in parts.lm.parameters():
            p.requires_grad_(False)
        names = components(parts)

        report(progress, "caching prompts", 0, 1)
        train = [(d, pair_batches(parts, d, tr, request.batch)) for d, tr, _ in split]
        tested = [b for d, _, te in split for b in pair_batches(parts, d, te, request.batch)]
        ones = torch.ones(len(names))
        with torch.no_grad():
            for b in [b for _, batches in train for b in batches] + tested:
                b.ld_orig = logit_diff(parts, b, ones)

        bases = {p.base: p.answer for _, tr, _ in split for p in tr}
        means = mean_activations(parts, [parts.ids(b) for b in bases])
        held = {p.base: p.answer for _, _, te in split for p in te}
        prompts = [(parts.ids(b), token_of(parts, a, "answer")) for b, a in held.items()]

        def fit(lam: float) -> tuple[Trained, list[Component], dict[str, Any]]:
            trained = train_mask(parts, train, lam, request.steps, request.lr, progress, f"masks, lambda {lam:g}")
            keep = (trained.mask >= 0.5).float()
            found = [c for c, k in zip(names, keep, strict=True) if k == 0]
            return trained, found, {"lambda": lam, "components": len(found),
                                    "desiderata_accuracy": desiderata_accuracy(parts, tested, keep),
                                    "ablated_accuracy": task_accuracy(parts, prompts, found, means),
                                    "circuit": [c.name for c in found]}

        trained, circuit, row = fit(request.lam)
        sweep = [row] + [fit(lam)[2] for lam in sorted(set(request.sweep) - {request.lam})]
        sweep.sort(key=lambda r: r["lambda"])

        report(progress, "ablating", 0, 1)
        clean = task_accuracy(parts, prompts)
        ablated = row["ablated_accuracy"]
        rng = random.Random(request.seed)
        outside = [c for c in names if c not in circuit]
        random_sets = [rng.sample(outside, min(len(circuit), len(outside))) for _ in range(request.random_sets)]
        random_accuracies = [task_accuracy(parts, prompts, s, means) for s in random_sets]
        metrics = {
            "components": [c.name for c in circuit],
            "component_count": len(circuit),
            "total_components": len(names),
            "task_accuracy": clean,
            "ablated_accuracy": ablated,
            "random_ablated_accuracy": sum(random_accuracies) / len(random_accuracies),
            "random_ablated_accuracies": random_accuracies,
            "desiderata_accuracy": row["desiderata_accuracy"],
            "desiderata_accuracy_unpatched": desiderata_accuracy(parts, tested, ones),
            "sweep": sweep,
            "tested": len(prompts),
            "tested_pairs": sum(len(b) for b in tested),
            "step_seconds": trained.step_seconds,
        }
        params = {"desiderata": request.source, "lambda": request.lam, "sweep": sorted(request.sweep),
                  "steps": request.steps, "lr": request.lr, "batch": request.batch, "holdout": request.holdout,
                  "random_sets": request.random_sets, "seed": request.seed,
                  "train_pairs": {d.name: len(tr) for d, tr, _ in split},
                  "test_pairs": {d.name: len(te) for d, _, te in split}}
        data = [{"name": d.name, "kind": d.kind, "weight": d.weight, "pairs": [p.__dict__ for p in d.pairs]}
                for d in request.desiderata]
        head_means, mlp_means = means
        return NewAnalysis(kind=self.kind, params=params, metrics=metrics, input_hash=data_hash(data),
                           tensors={"mask": trained.mask.contiguous(), "head_means": head_means.contiguous(),
                                    "mlp_means": mlp_means.contiguous()})
