"""The shipped desiderata files (analyses/desiderata/*.json), generated offline:
`python -m modelzoo.analyses.circuit_tasks` rewrites them from seed 0; tests draw fresh prompts with
other seeds.

- `lookup`: variable lookup in context, `k=7, p=3. k=` -> `7`, after `shots` solved examples of the same
  form (the queried variable is always the first one bound). Value dependence (`change`): the source binds
  another value to the queried variable, and patching should move the answer to it. Distractor invariance
  (`keep`): the source binds another value to the other variable, and patching should not move the answer
  towards that value.
- `arithmetic`: the paper's binding task, `x=3, y=4. x+y=` -> `7`, with single-digit operands and
  results (SmolLM2's tokenizer writes each digit as its own token). Value dependence: the source binds
  another x; operation invariance: the source swaps + and -, and patching should not move the answer
  towards the swapped operation's result.

Answers are the digit token that follows the prompt's `=` directly.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

NAMES = "abcdefghjkmnpqrstuvwxyz"


def _lookup_item(rng: random.Random) -> tuple[list[str], list[int]]:
    return rng.sample(NAMES, 2), rng.sample(range(10), 2)


def _lookup_text(names: list[str], values: list[int]) -> str:
    return f"{names[0]}={values[0]}, {names[1]}={values[1]}. {names[0]}="


def lookup(pairs: int = 80, shots: int = 4, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    value, distractor = [], []
    for _ in range(pairs):
        context = "".join(_lookup_text(n, v) + f"{v[0]}\n" for n, v in (_lookup_item(rng) for _ in range(shots)))
        names, values = _lookup_item(rng)
        other = rng.choice([x for x in range(10) if x not in values])
        base = context + _lookup_text(names, values)
        value.append({"base": base, "source": context + _lookup_text(names, [other, values[1]]),
                      "answer": str(values[0]), "target": str(other)})
        distractor.append({"base": base, "source": context + _lookup_text(names, [values[0], other]),
                           "answer": str(values[0]), "target": str(other)})
    return {"description": f"variable lookup, {shots}-shot: 'k=7, p=3. k=' -> 7 (seed {seed})", "desiderata": [
        {"name": "value_dependence", "kind": "change", "weight": 5.0, "pairs": value},
        {"name": "distractor_invariance", "kind": "keep", "weight": 1.0, "pairs": distractor}]}


def _sum(x: int, y: int, op: str) -> int:
    return x + y if op == "+" else x - y


def _arithmetic_item(rng: random.Random) -> tuple[int, int, str]:
    """Operands whose + and - results are both single digits, so both operations' answers are tokens."""
    while True:
        x, y = rng.randrange(10), rng.randrange(10)
        if x + y < 10 and x >= y:
            return x, y, rng.choice("+-")


def _arithmetic_text(x: int, y: int, op: str) -> str:
    return f"x={x}, y={y}. x{op}y="


def arithmetic(pairs: int = 80, shots: int = 2, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    value, operation = [], []
    for _ in range(pairs):
        context = "".join(_arithmetic_text(*item) + f"{_sum(*item)}\n"
                          for item in (_arithmetic_item(rng) for _ in range(shots)))
        x, y, op = _arithmetic_item(rng)
        while True:
            x2, _, _ = _arithmetic_item(rng)
            if x2 >= y and x2 + y < 10 and _sum(x2, y, op) != _sum(x, y, op):
                break
        swapped = "-" if op == "+" else "+"
        base = context + _arithmetic_text(x, y, op)
        answer = str(_sum(x, y, op))
        value.append({"base": base, "source": context + _arithmetic_text(x2, y, op), "answer": answer,
                      "target": str(_sum(x2, y, op))})
        if _sum(x, y, swapped) != _sum(x, y, op):  # y = 0 gives both operations one answer
            operation.append({"base": base, "source": context + _arithmetic_text(x, y, swapped), "answer": answer,
                              "target": str(_sum(x, y, swapped))})
    return {"description": f"arithmetic binding, {shots}-shot: 'x=3, y=4. x+y=' -> 7 (seed {seed})",
            "desiderata": [{"name": "value_dependence", "kind": "change", "weight": 5.0, "pairs": value},
                           {"name": "operation_invariance", "kind": "keep", "weight": 1.0, "pairs": operation}]}


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in (("lookup", lookup()), ("arithmetic", arithmetic())):
        (directory / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("desiderata"))
