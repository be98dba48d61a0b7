"""What the board analyses (probes, interventions) need of an Othello-GPT: its moves as tokens, its
residual stream after each block, the board labels a probe reads, and a picture of a board.

The game rules come from `modelzoo.demo.othello`, the one place that defines them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from modelzoo.analyses.lm import LmParts, lm_parts, residual
from modelzoo.demo.othello import BLACK, MOVE_SQUARES, NOBODY, SQUARES, TOKEN_OF_SQUARE, Games, bits_of
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel
from modelzoo.registry.tracing import trace

LABEL_SETS = ("mine-theirs", "black-white")
CLASSES = {"mine-theirs": ("empty", "mine", "theirs"), "black-white": ("empty", "black", "white")}


def othello_parts(model: LoadedModel) -> LmParts:
    """The LM's parts, once its tokenizer is checked to read each move square as Othello-GPT's token."""
    parts = lm_parts(model)
    ids = parts.tokenizer.convert_tokens_to_ids([SQUARES[s] for s in MOVE_SQUARES])
    if list(ids) != TOKEN_OF_SQUARE[MOVE_SQUARES].tolist():
        raise BadInput(f"{model.ref} is not an Othello-GPT: its tokenizer does not read the 60 move squares "
                       f"as tokens 1-60 (`zoo demo othello` builds one)")
    return parts


def check_layer(parts: LmParts, layer: int, ref: str) -> None:
    if not 0 <= layer < parts.n_layers:
        raise BadInput(f"layer {layer} is out of range: {ref} has blocks 0..{parts.n_layers - 1}")


@torch.no_grad()
def residuals(parts: LmParts, tokens: Tensor, layers: Sequence[int], batch_size: int = 256) -> dict[int, Tensor]:
    """layer -> (games, moves, hidden): the residual stream after block `layer` at every move."""
    names = {layer: parts.block(layer) for layer in layers}
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    for start in range(0, len(tokens), batch_size):
        part = tokens[start:start + batch_size].to(parts.lm.device)
        with trace(parts.lm, list(names.values()), stop=True) as traces:
            parts.lm(input_ids=part, attention_mask=(part != 0).long())
        for layer, name in names.items():
            out[layer].append(residual(traces[name].output).float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in out.items()}


def next_player(games: Games) -> np.ndarray:
    """(n, 60): who moves after each move; once the game is over, the opponent of its last mover."""
    movers = np.concatenate([np.full((len(games), 1), BLACK, np.int8), games.to_move[:, :-1]], axis=1)
    return np.where(games.to_move == NOBODY, 1 - movers, games.to_move).astype(np.int8)


def board_labels(black: np.ndarray, white: np.ndarray, player: np.ndarray, labels: str) -> np.ndarray:
    """(..., 64) classes of bitboards: 0 empty, then 1 black and 2 white, or 1 the player to move's
    (`player`) and 2 the other's."""
    if labels not in LABEL_SETS:
        raise BadInput(f"unknown label set {labels!r}; choose one of {', '.join(LABEL_SETS)}")
    b, w = bits_of(black), bits_of(white)
    classes = b * 1 + w * 2
    if labels == "mine-theirs":
        white_moves = (np.asarray(player) != BLACK)[..., None]
        classes = np.where(white_moves & (classes > 0), 3 - classes, classes)
    return classes.astype(np.int64)


def as_black_white(classes: Sequence[int] | Tensor, player: int, labels: str) -> list[int]:
    """Board classes in black/white terms: a mine/theirs reading is turned when white is to move."""
    swap = labels == "mine-theirs" and player != BLACK
    return [3 - int(c) if swap and int(c) > 0 else int(c) for c in classes]


@dataclass(frozen=True)
class BoardPanel:
    """One board of a picture: a title, 64 classes (0 empty, 1 black, 2 white) and marked squares."""

    title: str
    classes: Sequence[int]
    marked: Sequence[int] = ()  # e.g. legal moves: a small dot
    highlighted: Sequence[int] = ()  # e.g. the flipped square or probe errors: a red frame


def board_picture(panels: Sequence[BoardPanel], cell: int = 36) -> Image.Image:
    """The boards side by side, columns a-h left to right and rows 1-8 top to bottom."""
    margin, title = cell // 2, cell
    size = 8 * cell
    image = Image.new("RGB", (len(panels) * (size + 2 * margin), size + title + 2 * margin), "white")
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default(size=max(10, cell // 3))
    for p, panel in enumerate(panels):
        x0, y0 = p * (size + 2 * margin) + margin, title + margin
        draw.text((x0, margin // 2), panel.title, fill="black")
        for i, c in enumerate(panel.classes):
            row, col = divmod(i, 8)
            box = (x0 + col * cell, y0 + row * cell, x0 + (col + 1) * cell, y0 + (row + 1) * cell)
            draw.rectangle(box, fill=(40, 130, 70), outline=(20, 60, 30))
            if c:
                inset = cell // 8
                draw.ellipse((box[0] + inset, box[1] + inset, box[2] - inset, box[3] - inset),
                             fill="black" if c == 1 else "white", outline="black")
            if i in panel.marked:
                r = cell // 8
                cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 200, 40))
            if i in panel.highlighted:
                draw.rectangle(box, outline="red", width=3)
        for k in range(8):
            draw.text((x0 + k * cell + cell // 2 - 3, y0 + size + 2), "abcdefgh"[k], fill="black")
            draw.text((x0 - margin + 3, y0 + k * cell + cell // 2 - 5), str(k + 1), fill="black")
    return image


def accuracy_plot(rows: Sequence[dict[str, Any]], title: str, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """Probe accuracy against layer, one line per probe kind and label set (solid: the trained model,
    dashed: the random one), from a sweep's table rows (layer, kind, labels, accuracy, baseline_accuracy)."""
    width, height = size
    left, right, top, bottom = 50, 170, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default(size=12)
    layers = sorted({int(r["layer"]) for r in rows})
    low = min(0.3, min(min(r["accuracy"], r["baseline_accuracy"]) for r in rows))

    def point(layer: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * (layers.index(layer) / max(1, len(layers) - 1))
        return x, top + (height - top - bottom) * (1 - (value - low) / (1 - low))

    draw.text((left, 8), title, fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for tick in np.linspace(low, 1.0, 6):
        y = point(layers[0], float(tick))[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((5, y - 6), f"{tick:.2f}", fill="black")
    for layer in layers:
        x = point(layer, low)[0]
        draw.text((x - 3, height - bottom + 6), str(layer), fill="black")
    draw.text(((left + width - right) // 2 - 20, height - 16), "layer", fill="black")
    colours = {("linear", "mine-theirs"): (200, 40, 40), ("linear", "black-white"): (40, 80, 200),
               ("mlp", "mine-theirs"): (230, 140, 30), ("mlp", "black-white"): (40, 160, 90)}
    for n, ((kind, labels), colour) in enumerate(colours.items()):
        line = sorted((int(r["layer"]), r["accuracy"], r["baseline_accuracy"]) for r in rows
                      if (r["kind"], r["labels"]) == (kind, labels))
        if not line:
            continue
        trained = [point(layer, a) for layer, a, _ in line]
        baseline = [point(layer, b) for layer, _, b in line]
        if len(trained) > 1:
            draw.line(trained, fill=colour, width=3)
        for a, b in zip(baseline[:-1], baseline[1:], strict=False):
            for k in range(0, 10, 2):  # dashes
                draw.line((a[0] + (b[0] - a[0]) * k / 10, a[1] + (b[1] - a[1]) * k / 10,
                           a[0] + (b[0] - a[0]) * (k + 1) / 10, a[1] + (b[1] - a[1]) * (k + 1) / 10), fill=colour)
        for x, y in trained:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        y = top + 10 + 18 * n
        draw.line((width - right + 10, y, width - right + 30, y), fill=colour, width=3)
        draw.text((width - right + 35, y - 6), f"{kind} {labels}", fill="black")
    draw.text((width - right + 10, top + 10 + 18 * 4), "dashed: random model", fill="black")
    return image
