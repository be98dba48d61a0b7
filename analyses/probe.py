"""Board-state probes of Othello-GPT (Li et al. 2023, "Emergent World Representations", arXiv
2210.13382, section 3; Nanda et al. 2023 for the mine/theirs labels).

A probe is one 3-way classifier per square (64 of them, fitted together) from the residual stream x after
block `layer` at a move to the square's state after that move:

    linear:  logits = x W + b                         W: (hidden, 64 * 3)
    mlp:     logits = relu(x W1 + b1) W2 + b2         W1: (hidden, width), W2: (width, 64 * 3)

(the paper's two-layer probe shares its hidden layer among the squares, as here). The classes are empty /
black / white, or empty / mine / theirs from the side of the player to move. Probes are fitted with Adam on
the cross-entropy over every move of `games` new random games (never seen in training: each training step
draws its own) and graded on `test_games` more. `accuracy` is the mean over squares and moves of the test
games; `baseline_accuracy` is the same probe fitted on a randomly initialised model of the same config,
which shows how much of the board the architecture alone exposes (the occupied squares, for one).

A probe at `layer` also fits the probes of every block above it: an intervention (`othello_intervene`)
edits the residual stream from `layer` upward, each block's against its own probe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForCausalLM

from modelzoo.analyses.base import AnalysisProgress, report
from modelzoo.analyses.lm import LmParts
from modelzoo.analyses.othello_board import (
    LABEL_SETS,
    as_black_white,
    board_labels,
    check_layer,
    next_player,
    othello_parts,
    residuals,
)
from modelzoo.demo.othello import SQUARES, Games, move_tokens, random_games
from modelzoo.registry.analyses import NewAnalysis, data_hash
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel

KINDS = ("linear", "mlp")
GAMES_SEED = 2210  # the probes' games: another stream than training's


@dataclass(frozen=True)
class ProbeRequest:
    layer: int | None = None  # None only for a sweep
    kind: str = "linear"
    labels: str = "mine-theirs"
    sweep: bool = False  # every layer, both kinds, both label sets; stores the table, no probes
    games: int = 200
    test_games: int = 100
    width: int = 256  # the mlp probe's hidden layer: wide enough for 64 squares' classes
    steps: int = 300
    batch_size: int = 1024  # moves per Adam step
    lr: float = 1e-2
    seed: int = 0

    def check(self) -> None:
        if self.kind not in KINDS:
            raise BadInput(f"unknown probe kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.labels not in LABEL_SETS:
            raise BadInput(f"unknown label set {self.labels!r}; choose one of {', '.join(LABEL_SETS)}")
        if self.sweep == (self.layer is not None):
            raise BadInput("give either --layer L or --sweep")
        if min(self.games, self.test_games, self.width, self.steps, self.batch_size) < 1 or self.lr <= 0:
            raise BadInput("games, test games, width, steps, batch size and lr must be positive")


@dataclass(frozen=True)
class Probe:
    """A fitted probe at one layer: its tensors by name (W, b or W1, b1, W2, b2)."""

    kind: str
    tensors: dict[str, Tensor]

    def logits(self, x: Tensor) -> Tensor:
        """(..., 64, 3) class logits of residuals x (..., hidden)."""
        t = self.tensors
        hidden = x if self.kind == "linear" else F.relu(x @ t["W1"] + t["b1"])
        last = ("W", "b") if self.kind == "linear" else ("W2", "b2")
        return (hidden @ t[last[0]] + t[last[1]]).unflatten(-1, (64, 3))


def fit_probe(x: Tensor, y: Tensor, kind: str, width: int, steps: int, lr: float, seed: int,
              batch_size: int = 1024) -> Probe:
    """Fit on residuals x (n, hidden) and classes y (n, 64) with Adam on random batches of moves. The
    inputs are standardised inside the probe (folded into its first weights), so one learning rate fits
    every layer."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    hidden = x.shape[1]
    if kind == "linear":
        shapes = {"W": (hidden, 192), "b": (192,)}
    else:
        shapes = {"W1": (hidden, width), "b1": (width,), "W2": (width, 192), "b2": (192,)}
    params = {name: (torch.randn(shape, generator=generator) / shape[0] ** 0.5 if len(shape) == 2
                     else torch.zeros(shape)).requires_grad_() for name, shape in shapes.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    probe = Probe(kind, params)
    for _ in range(steps):
        rows = torch.randint(len(z), (min(batch_size, len(z)),), generator=generator)
        loss = F.cross_entropy(probe.logits(z[rows]).flatten(0, 1), y[rows].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    first = "W" if kind == "linear" else "W1"
    bias = "b" if kind == "linear" else "b1"
    with torch.no_grad():
        folded = {name: p.detach().clone() for name, p in params.items()}
        folded[first] = params[first].detach() / std[:, None]
        folded[bias] = params[bias].detach() - (mean / std) @ params[first].detach()
    return Probe(kind, folded)


@torch.no_grad()
def accuracy(probe: Probe, x: Tensor, y: Tensor) -> float:
    return float((probe.logits(x).argmax(-1) == y).float().mean())


@dataclass(frozen=True)
class ProbeData:
    """Every move of the fitting and the test games: residuals by layer, and classes by label set."""

    fit_x: dict[int, Tensor]
    test_x: dict[int, Tensor]
    fit_y: dict[str, Tensor]
    test_y: dict[str, Tensor]
    test_games: Games


def _moves(games: Games) -> np.ndarray:
    return np.arange(games.moves.shape[1])[None, :] < games.lengths[:, None]


def probe_data(parts: LmParts, request: ProbeRequest, layers: list[int], label_sets: list[str]) -> ProbeData:
    rng = np.random.default_rng([request.seed, GAMES_SEED])
    sets = {"fit": random_games(request.games, rng), "test": random_games(request.test_games, rng)}
    xs: dict[str, dict[int, Tensor]] = {}
    ys: dict[str, dict[str, Tensor]] = {}
    for split, games in sets.items():
        played = _moves(games)
        by_layer = residuals(parts, torch.from_numpy(move_tokens(games.moves)), layers)
        xs[split] = {layer: x[torch.from_numpy(played)] for layer, x in by_layer.items()}
        player = next_player(games)
        ys[split] = {labels: torch.from_numpy(board_labels(games.black, games.white, player, labels)[played])
                     for labels in label_sets}
    return ProbeData(xs["fit"], xs["test"], ys["fit"], ys["test"], sets["test"])


def random_twin(parts: LmParts, seed: int) -> LmParts:
    """The same architecture freshly initialised (seeded), for the baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(parts.lm.config).eval()
    return replace(parts, lm=lm)


def _example(data: ProbeData, tensors: dict[str, Tensor], request: ProbeRequest) -> dict[str, object]:
    """The first test game at its 30th move (or its end): the board and the probe's reading at `layer`,
    both in black/white terms, for a picture."""
    assert request.layer is not None
    games = data.test_games
    t = min(29, int(games.lengths[0]) - 1)  # rows of the first game come first
    probe = Probe(request.kind, {name.split(".", 1)[1]: v for name, v in tensors.items()
                                 if name.startswith(f"layer{request.layer}.")})
    player = int(next_player(games)[0, t])
    reading = probe.logits(data.test_x[request.layer][t]).argmax(-1)
    return {"game": " ".join(SQUARES[m] for m in games.moves[0, : t + 1]), "move": t + 1,
            "board": as_black_white(data.test_y[request.labels][t], player, request.labels),
            "probe": as_black_white(reading, player, request.labels)}


class ProbeAnalyzer:
    kind: ClassVar[str] = "probe"
    families: ClassVar[tuple[str, ...]] = ("lm",)

    def check(self, request: ProbeRequest) -> None:
        request.check()

    def analyze(self, model: LoadedModel, request: ProbeRequest, progress: AnalysisProgress | None = None
                ) -> NewAnalysis:
        parts = othello_parts(model)
        if request.layer is not None:
            check_layer(parts, request.layer, model.ref)
        if request.sweep:
            return self._sweep(parts, request, progress)
        assert request.layer is not None
        layers = list(range(request.layer, parts.n_layers))
        report(progress, "residuals", 0, len(layers) + 1)
        data = probe_data(parts, request, layers, [request.labels])
        tensors: dict[str, Tensor] = {}
        by_layer: dict[str, float] = {}
        for i, layer in enumerate(layers):
            report(progress, f"probe at layer {layer}", i, len(layers) + 1)
            probe = self._fit(data, layer, request, request.kind, request.labels)
            by_layer[str(layer)] = round(accuracy(probe, data.test_x[layer], data.test_y[request.labels]), 4)
            tensors.update({f"layer{layer}.{name}": t for name, t in probe.tensors.items()})
        report(progress, "baseline: the random model", len(layers), len(layers) + 1)
        baseline = probe_data(random_twin(parts, request.seed), request, [request.layer], [request.labels])
        base_probe = self._fit(baseline, request.layer, request, request.kind, request.labels)
        metrics = {
            "example": _example(data, tensors, request),
            "layer": request.layer, "kind": request.kind, "labels": request.labels,
            "accuracy": by_layer[str(request.layer)],
            "baseline_accuracy": round(accuracy(base_probe, baseline.test_x[request.layer],
                                                baseline.test_y[request.labels]), 4),
            "accuracy_by_layer": by_layer, "layers": layers, "test_moves": int(len(data.test_y[request.labels])),
        }
        return NewAnalysis("probe", self._params(request), metrics, self._input_hash(request), tensors)

    def _sweep(self, parts: LmParts, request: ProbeRequest, progress: AnalysisProgress | None) -> NewAnalysis:
        layers = list(range(parts.n_layers))
        cells = [(layer, kind, labels) for layer in layers for kind in KINDS for labels in LABEL_SETS]
        found: dict[str, dict[tuple[int, str, str], float]] = {}
        for name, twin in (("trained", parts), ("random", random_twin(parts, request.seed))):
            data = probe_data(twin, request, layers, list(LABEL_SETS))
            found[name] = {}
            for layer, kind, labels in cells:
                report(progress, f"{name} model: {kind} {labels} probe at layer {layer}",
                       len(found["trained"]) + len(found.get("random", {})), 2 * len(cells))
                probe = self._fit(data, layer, request, kind, labels)
                found[name][layer, kind, labels] = round(accuracy(probe, data.test_x[layer], data.test_y[labels]), 4)
        table = [{"layer": layer, "kind": kind, "labels": labels, "accuracy": found["trained"][layer, kind, labels],
                  "baseline_accuracy": found["random"][layer, kind, labels]} for layer, kind, labels in cells]
        best = max((r for r in table if r["kind"] == "linear" and r["labels"] == "mine-theirs"),
                   key=lambda r: r["accuracy"])
        metrics = {"sweep": True, "layer": best["layer"], "kind": "linear", "labels": "mine-theirs",
                   "accuracy": best["accuracy"], "baseline_accuracy": best["baseline_accuracy"], "table": table}
        return NewAnalysis("probe", self._params(request), metrics, self._input_hash(request))

    @staticmethod
    def _fit(data: ProbeData, layer: int, request: ProbeRequest, kind: str, labels: str) -> Probe:
        return fit_probe(data.fit_x[layer], data.fit_y[labels], kind, request.width, request.steps, request.lr,
                         request.seed, request.batch_size)

    @staticmethod
    def _params(request: ProbeRequest) -> dict[str, object]:
        return {k: getattr(request, k) for k in ProbeRequest.__dataclass_fields__}

    @staticmethod
    def _input_hash(request: ProbeRequest) -> str:
        return data_hash({"games": request.games, "test_games": request.test_games, "seed": request.seed,
                          "games_seed": GAMES_SEED})
