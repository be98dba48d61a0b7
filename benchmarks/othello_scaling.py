"""Othello-GPT's board probe against its shape and the games it has seen. Each shape is trained with the
demo's recipe (`modelzoo.demo.othello_gpt.train_othello_gpt`, seed 0), then the shipped linear mine-theirs
probe (`modelzoo.analyses.probe`: 200 games to fit, 100 to grade, 300 Adam steps) is fitted at every layer on
probe games of seed 1, not the seed `zoo analyze probe` uses by default. Prints JSON; `--out` is rewritten
after every shape.

    python benchmarks/othello_scaling.py --shapes 4x128x32x7000 8x256x256x7000@3e-3 [--device cuda]

A shape is layers x width x games per step x steps, with the learning rate after `@` (default the full
profile's 2e-3) and width / 32 heads. The full build is 4x128x32x7000 (0.8M parameters, 224,000 games, about
1,360 s on 2 CPU threads).

Measured on one H200 with a first form of this script (several shapes at once; games drawn ahead rather than
per step; probes graded on 500 games): the best layer's accuracy with the shipped probe, then with the same
probe fitted on 2,000 games by 800 steps of 8,192 moves; the full recipe otherwise:

| shape (layers x width) | games per step x steps | games | parameters | legal top-1 | probe | larger probe |
|---|---|---|---|---|---|---|
| 4 x 128 | 32 x 7,000 (the full build) | 224,000 | 0.81M | 0.967 | 0.855 | 0.865 |
| 4 x 128, lr 4e-3 | 32 x 7,000 | 224,000 | 0.81M | 0.961 | 0.852 | 0.862 |
| 4 x 128, the drawn move as target | 32 x 7,000 | 224,000 | 0.81M | 0.901 | 0.794 | 0.811 |
| 8 x 128 | 32 x 3,500 | 112,000 | 1.60M | 0.924 | 0.804 | 0.816 |
| 8 x 128 | 32 x 7,000 | 224,000 | 1.60M | 0.968 | 0.854 | 0.863 |
| 6 x 128 | 32 x 4,700 | 150,400 | 1.21M | 0.950 | 0.834 | 0.844 |
| 8 x 64 | 32 x 7,000 | 224,000 | 0.41M | 0.911 | 0.765 | 0.773 |
| 12 x 64 | 32 x 7,000 | 224,000 | 0.61M | 0.919 | 0.776 | 0.785 |
| 2 x 128 | 32 x 14,000 | 448,000 | 0.41M | 0.970 | 0.854 | 0.866 |
| 4 x 128 | 32 x 14,000 | 448,000 | 0.81M | 0.978 | 0.872 | 0.882 |
| 4 x 128, lr 2.8e-3 | 64 x 7,000 | 448,000 | 0.81M | 0.976 | 0.869 | 0.879 |
| 4 x 128, lr 4e-3 | 128 x 7,000 | 896,000 | 0.81M | 0.978 | 0.877 | 0.886 |
| 4 x 128, lr 5.6e-3 | 256 x 7,000 | 1,792,000 | 0.81M | 0.980 | 0.884 | 0.893 |
| 8 x 256 (8 heads), lr 3e-3 | 256 x 1,750 of 7,000 (stopped) | 448,000 | 6.35M | 0.973 | 0.888 | 0.902 |

On the CPU budget of the full build, games seen decide, not depth (8 x 128 on the same games: 0.854), and the
probe saturates with games at this width: eight times the full build's games reach 0.884. Only a wider,
deeper model reads 0.90, at about 16 times the full build's arithmetic (7.8 times the parameters, twice the
games). The paper's model has 8 layers of width 512 and saw 20M games.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel
from transformers.utils import logging as transformers_logging

from modelzoo.analyses.lm import LmParts
from modelzoo.analyses.probe import ProbeRequest, accuracy, fit_probe, probe_data
from modelzoo.demo.othello_gpt import PROFILES, OthelloProfile, train_othello_gpt
from modelzoo.registry.families.lm import without_progress_bars

HEAD_WIDTH = 32


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    batch: int
    steps: int
    lr: float

    @classmethod
    def parse(cls, text: str) -> Shape:
        dims, _, lr = text.partition("@")
        layers, width, batch, steps = (int(x) for x in dims.split("x"))
        return cls(layers, width, batch, steps, float(lr) if lr else PROFILES["full"].lr)

    def profile(self) -> OthelloProfile:
        full = PROFILES["full"]
        return OthelloProfile(steps=self.steps, batch_size=self.batch, lr=self.lr, warmup=full.warmup,
                              n_embd=self.width, n_layer=self.layers, n_head=max(1, self.width // HEAD_WIDTH),
                              threads=full.threads)


def probe_by_layer(folder: Path, device: str) -> list[float]:
    """The shipped linear mine-theirs probe's test accuracy after every block of the model in `folder`."""
    with without_progress_bars(transformers_logging):
        lm = GPT2LMHeadModel.from_pretrained(folder).to(device).eval()
    config = lm.config
    parts = LmParts(lm, AutoTokenizer.from_pretrained(folder), "gpt2", config.n_layer, config.n_head, config.n_embd)
    request = ProbeRequest(layer=0, seed=1)
    layers = list(range(config.n_layer))
    data = probe_data(parts, request, layers, ["mine-theirs"])
    return [round(accuracy(fit_probe(data.fit_x[layer], data.fit_y["mine-theirs"], "linear", request.width,
                                     request.steps, request.lr, request.seed, request.batch_size),
                           data.test_x[layer], data.test_y["mine-theirs"]), 4) for layer in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4x128x32x7000"], help="layers x width x batch x steps[@lr]")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("othello_scaling.json"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for text in args.shapes:
        shape = Shape.parse(text)
        with tempfile.TemporaryDirectory() as folder:
            metrics = train_othello_gpt(Path(folder), seed=0, profile=shape.profile(), device=args.device)
            probes = probe_by_layer(Path(folder), args.device)
        rows.append({"shape": text, "games": metrics["games_seen"], "parameters": metrics["parameters"],
                     "seconds": metrics["seconds"], "legal_top1": metrics["legal_top1"],
                     "probe_by_layer": probes, "best_probe": max(probes)})
        args.out.write_text(json.dumps({"device": args.device, "rows": rows}, indent=2))
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"device": args.device, "rows": rows}))


if __name__ == "__main__":
    main()
