"""Synthetic Othello games per second on one core (`modelzoo.demo.othello.random_games`), best of a few
repeats per batch size, with the game-length statistics of the games drawn. Prints JSON.
    OMP_NUM_THREADS=1 python benchmarks/othello.py [--games 100000] [--batches 1000 10000 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from modelzoo.demo.othello import random_games


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--games", type=int, default=100_000, help="games drawn per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        best = float("inf")
        lengths = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for _ in range(max(1, args.games // batch)):
                lengths.append(random_games(batch, rng).lengths)
            best = min(best, time.perf_counter() - started)
        drawn = max(1, args.games // batch) * batch
        every = np.concatenate(lengths)
        rows.append({"batch": batch, "games": drawn, "seconds": round(best, 3), "games_per_s": round(drawn / best),
                     "mean_length": round(float(every.mean()), 2),
                     "full_length_share": round(float((every == 60).mean()), 3)})
    print(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "load_average": os.getloadavg()[0],
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
