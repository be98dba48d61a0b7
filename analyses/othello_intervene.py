"""Interventions on Othello-GPT's board state (Li et al. 2023, arXiv 2210.13382, section 4).

To ask whether the model uses the board its probe reads, edit the board in its activations and watch its
predictions. At the last move of a game, the residual stream x_l after block l is replaced, for l = L,
L+1, ..., the last block, by the x'_l that minimises the probe's cross-entropy against the edited board

    sum over squares s of  w_s CE(probe_l(x'_l)_s, edited_s),   w = 1 on the flipped square, `reg` elsewhere

by Adam steps from x_l (the paper's `intervene`: lr 1e-3, reg 0.2, at every layer from L up). Each
block's input at the last move is the previous block's edited output; earlier moves are left alone. The
model then predicts the next move from the edited stream.

The predicted legal moves are the tokens with probability above `threshold`. The error of an
intervention is the size of the symmetric difference between that set and the edited board's legal
moves; `baseline_error` is the same for the unedited model. The paper counts errors without a threshold:
of the model's N most likely moves, N the number of the edited board's legal moves, how many are not
legal there (about 0.1-0.2 after, 2.7 before, on its 8-layer model); that is `top_n_error` and
`top_n_baseline_error`. Random interventions (`batch`) flip one disc of a position of a random game, chosen
so that the flip changes the legal moves (otherwise the unedited model would already be right).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from modelzoo.analyses.base import AnalysisProgress, report
from modelzoo.analyses.lm import LmParts, residual, with_residual
from modelzoo.analyses.othello_board import as_black_white, board_labels, check_layer, othello_parts
from modelzoo.analyses.probe import Probe
from modelzoo.demo.othello import (
    MOVE_SQUARES,
    NOBODY,
    SQUARES,
    TOKEN_OF_SQUARE,
    Position,
    play,
    random_games,
    square,
    squares_of,
)
from modelzoo.registry.analyses import NewAnalysis, analysis_tensors, data_hash, get_analysis
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.store import Registry
from modelzoo.registry.tracing import trace

BATCH_SEED = 4242  # the random interventions' games: another stream than training's and the probes'


@dataclass(frozen=True)
class StoredProbe:
    """A probe analysis read back: its probes at layer `layer` and every block above."""

    id: int
    ref: str
    layer: int
    kind: str
    labels: str
    probes: dict[int, Probe]


def load_probe(registry: Registry, ref: str, probe_id: int) -> StoredProbe:
    """The stored probe `probe_id`, checked to be a probe of the version `ref`."""
    target = registry.info(ref).ref
    info = get_analysis(registry, probe_id)
    if info.kind != "probe":
        raise BadInput(f"analysis {probe_id} is a {info.kind} analysis, not a probe")
    if info.ref != target:
        raise BadInput(f"probe {probe_id} was fitted on {info.ref}, not {target}: fit one with "
                       f"`zoo analyze probe {target} --layer L`")
    if info.metrics.get("sweep"):
        raise BadInput(f"analysis {probe_id} is a sweep, which keeps no probes: fit one with --layer L")
    tensors = analysis_tensors(registry, probe_id)
    kind = info.metrics["kind"]
    probes = {layer: Probe(kind, {name.split(".", 1)[1]: t for name, t in tensors.items()
                                  if name.startswith(f"layer{layer}.")}) for layer in info.metrics["layers"]}
    return StoredProbe(probe_id, info.ref, int(info.metrics["layer"]), kind, info.metrics["labels"], probes)


@dataclass(frozen=True)
class InterveneRequest:
    probe: StoredProbe
    game: tuple[str, ...] = ()  # one intervention: the moves, then the square whose disc is flipped
    flip: str | None = None
    batch: int = 0  # or this many random ones
    seed: int = 0
    threshold: float = 0.01
    steps: int = 1000
    lr: float = 1e-3
    reg: float = 0.2

    def check(self) -> None:
        if (self.batch > 0) == bool(self.game or self.flip):
            raise BadInput("give either --game and --flip, or --batch N")
        if self.batch < 0 or self.steps < 1 or self.lr <= 0 or self.reg < 0 or not 0 < self.threshold < 1:
            raise BadInput("batch >= 0, steps >= 1, lr > 0, reg >= 0 and 0 < threshold < 1 are needed")
        if not self.batch:
            if not self.game or self.flip is None:
                raise BadInput("an intervention needs --game (moves separated by spaces) and --flip SQUARE")
            case(self.game, self.flip)

    def params(self) -> dict[str, Any]:
        return {"probe": self.probe.id, "layer": self.probe.layer, "game": " ".join(self.game), "flip": self.flip,
                "batch": self.batch, "seed": self.seed, "threshold": self.threshold, "steps": self.steps,
                "lr": self.lr, "reg": self.reg}


@dataclass(frozen=True)
class Case:
    """One intervention: the moves so far, the position after them, and the position with a disc flipped."""

    moves: tuple[int, ...]
    flip: int
    before: Position
    after: Position


def case(game: tuple[str, ...], flip: str) -> Case:
    """The intervention of a user's game: BadInput for an unknown square, an illegal move, a finished game
    or an empty square to flip."""
    positions = play(game)
    position = positions[-1]
    if position.to_move == NOBODY:
        raise BadInput("the game is over after its last move: there is no next move to predict")
    index = square(flip)
    edited = position.flipped(index)
    if not edited.legal():
        raise BadInput(f"after flipping {SQUARES[index]} the player to move has no legal move to predict")
    return Case(tuple(square(m) for m in game), index, position, edited)


def random_cases(n: int, seed: int) -> list[Case]:
    """`n` random interventions: a random move of a random game, a random disc whose flip changes the
    legal moves (and leaves the player to move some)."""
    rng = np.random.default_rng([seed, BATCH_SEED])
    cases: list[Case] = []
    while len(cases) < n:
        games = random_games(max(8, n), rng)
        for g in range(len(games)):
            t = int(rng.integers(0, games.lengths[g]))
            if games.to_move[g, t] == NOBODY:
                continue
            position = Position(int(games.black[g, t]), int(games.white[g, t]), int(games.to_move[g, t]))
            discs = squares_of(position.black | position.white)
            flip = square(discs[int(rng.integers(len(discs)))])
            edited = position.flipped(flip)
            if edited.legal() and edited.legal() != position.legal():
                cases.append(Case(tuple(int(m) for m in games.moves[g, : t + 1]), flip, position, edited))
            if len(cases) == n:
                break
    return cases


def _tokens(cases: list[Case]) -> tuple[Tensor, Tensor]:
    """Right-padded tokens of the cases' moves and the index of each one's last move."""
    tokens = torch.zeros(len(cases), max(len(c.moves) for c in cases), dtype=torch.long)
    for i, c in enumerate(cases):
        tokens[i, : len(c.moves)] = torch.from_numpy(TOKEN_OF_SQUARE[list(c.moves)])
    return tokens, torch.tensor([len(c.moves) - 1 for c in cases])


def _labels(positions: list[Position], labels: str) -> Tensor:
    black = np.array([p.black for p in positions], dtype=np.uint64)
    white = np.array([p.white for p in positions], dtype=np.uint64)
    return torch.from_numpy(board_labels(black, white, np.array([p.to_move for p in positions]), labels))


def edit_to_board(probe: Probe, x: Tensor, target: Tensor, flipped: Tensor, steps: int, lr: float, reg: float
                  ) -> Tensor:
    """x' (n, hidden) from x by Adam on the probe's weighted cross-entropy against `target` (n, 64)."""
    weight = torch.full(target.shape, reg)
    weight[torch.arange(len(x)), flipped] = 1.0
    edited = x.detach().clone().requires_grad_()
    optimizer = torch.optim.Adam([edited], lr=lr)
    for _ in range(steps):
        loss = (weight * F.cross_entropy(probe.logits(edited).transpose(1, 2), target, reduction="none")).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return edited.detach()


@torch.no_grad()
def _next_move_probs(parts: LmParts, tokens: Tensor, last: Tensor, edits: dict[int, Tensor],
                     read: int | None = None) -> tuple[Tensor, Tensor | None]:
    """(next-move probabilities at each row's last move, the residual after block `read` there), with the
    outputs of the blocks in `edits` replaced at the last move."""
    rows = torch.arange(len(tokens))
    names = {parts.block(layer): layer for layer in [*edits, *([read] if read is not None else [])]}

    def edit(name: str, output: Any) -> Any:
        layer = names[name]
        if layer not in edits:
            return output
        hidden = residual(output).clone()
        hidden[rows, last] = edits[layer].to(hidden.dtype)
        return with_residual(output, hidden)

    with trace(parts.lm, list(names), edit_output=edit) as traces:
        logits = parts.lm(input_ids=tokens, attention_mask=(tokens != 0).long()).logits[rows, last]
    probs = logits.float().softmax(-1)
    read_x = residual(traces[parts.block(read)].output)[rows, last].float() if read is not None else None
    return probs, read_x


def predicted(probs: Tensor, threshold: float) -> list[int]:
    """Squares whose move token's probability is above `threshold` (padding never counts)."""
    return [MOVE_SQUARES[int(t) - 1] for t in torch.nonzero(probs[1:] > threshold)[:, 0] + 1]


def top_n_misses(probs: Tensor, legal: set[str]) -> int:
    """Of the len(legal) most likely moves, how many are not in `legal` (the paper's error count)."""
    order = probs[1:].argsort(descending=True)[: len(legal)] + 1
    return len(legal - set(_names([MOVE_SQUARES[int(t) - 1] for t in order])))


def _names(squares: list[int] | int) -> list[str]:
    """Square names in board order, of indices or of a bitboard."""
    return [SQUARES[s] for s in sorted(squares)] if isinstance(squares, list) else squares_of(squares)


class InterveneAnalyzer:
    kind: ClassVar[str] = "intervene"
    families: ClassVar[tuple[str, ...]] = ("lm",)

    def check(self, request: InterveneRequest) -> None:
        request.check()

    def analyze(self, model: LoadedModel, request: InterveneRequest, progress: AnalysisProgress | None = None
                ) -> NewAnalysis:
        parts = othello_parts(model)
        stored = request.probe
        for layer in stored.probes:
            check_layer(parts, layer, model.ref)
        cases = random_cases(request.batch, request.seed) if request.batch else [case(request.game, request.flip or "")]
        tokens, last = _tokens(cases)
        target = _labels([c.after for c in cases], stored.labels)
        flipped = torch.tensor([c.flip for c in cases])
        edits: dict[int, Tensor] = {}
        readings: dict[str, Tensor] = {}
        layers = sorted(stored.probes)
        for i, layer in enumerate(layers):
            report(progress, f"editing layer {layer}", i, len(layers))
            _, x = _next_move_probs(parts, tokens, last, edits, read=layer)
            assert x is not None
            if layer == stored.layer:
                readings["before"] = stored.probes[layer].logits(x).argmax(-1)
            edits[layer] = edit_to_board(stored.probes[layer], x, target, flipped, request.steps, request.lr,
                                         request.reg)
            readings[f"after_{layer}"] = stored.probes[layer].logits(edits[layer]).argmax(-1)
        before, _ = _next_move_probs(parts, tokens, last, {})
        after, _ = _next_move_probs(parts, tokens, last, edits)
        errors, baseline, original, top_n, top_n_baseline = [], [], [], [], []
        for i, c in enumerate(cases):
            edited_legal, original_legal = set(_names(c.after.legal())), set(_names(c.before.legal()))
            pred_before = set(_names(predicted(before[i], request.threshold)))
            pred_after = set(_names(predicted(after[i], request.threshold)))
            errors.append(len(pred_after ^ edited_legal))
            baseline.append(len(pred_before ^ edited_legal))
            original.append(len(pred_before ^ original_legal))
            top_n.append(top_n_misses(after[i], edited_legal))
            top_n_baseline.append(top_n_misses(before[i], edited_legal))
        reads_edit = torch.stack([(readings[f"after_{layer}"] == target).all(-1) for layer in layers]).all(0)
        metrics: dict[str, Any] = {
            "layer": stored.layer, "probe": stored.id, "probe_kind": stored.kind, "labels": stored.labels,
            "count": len(cases), "error": float(np.mean(errors)), "baseline_error": float(np.mean(baseline)),
            "original_error": float(np.mean(original)), "probe_reads_edit": float(reads_edit.float().mean()),
            "top_n_error": float(np.mean(top_n)), "top_n_baseline_error": float(np.mean(top_n_baseline)),
            "threshold": request.threshold,
        }
        first = cases[0]
        to_black_white = _labels([first.before, first.after], "black-white")
        probe_black_white = [as_black_white(readings["before"][0], first.before.to_move, stored.labels),
                             as_black_white(readings[f"after_{stored.layer}"][0], first.after.to_move, stored.labels)]
        metrics["example"] = {
            "game": " ".join(SQUARES[m] for m in first.moves), "flip": SQUARES[first.flip],
            "legal_before": _names(first.before.legal()), "legal_after": _names(first.after.legal()),
            "predicted_before": _names(predicted(before[0], request.threshold)),
            "predicted_after": _names(predicted(after[0], request.threshold)),
            "board_before": to_black_white[0].tolist(), "board_after": to_black_white[1].tolist(),
            "probe_before": probe_black_white[0], "probe_after": probe_black_white[1],
        }
        input_hash = data_hash({"cases": [[list(c.moves), c.flip] for c in cases], "probe": stored.id})
        return NewAnalysis("intervene", request.params(), metrics, input_hash)

