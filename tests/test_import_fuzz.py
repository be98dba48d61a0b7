"""Fuzzing `zoo import` with seeded mutations of a valid safetensors header, config.json and GGUF prefix.

The only outcomes allowed are success (exit 0) or exit 2 with a single `error:` line: no traceback, no
other exit code, no exception escaping the CLI. The default suite runs a sample of each kind; the slow
suite runs over 2,000 in all. A failure names the kind and seed, so it replays exactly.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import zoo_cli
from safetensors.torch import save_file

Mutator = Callable[[random.Random, bytes], bytes]
JSON_VALUES: list[object] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**63), 10**30, 1.5, -0.0, 1e308, "", "1e9", "F32", "../..",
    "\n", [], [0], [-1], [2**62, 2**62], [[[]]], {}, {"a": 1}, "x" * 1000,
]


def random_value(rng: random.Random, depth: int = 0) -> object:
    choice = rng.random()
    if choice < 0.7 or depth > 3:
        return rng.choice(JSON_VALUES)
    if choice < 0.85:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["dtype", "shape", "data_offsets", "n_layer", "x"]): random_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


def mutate_bytes(rng: random.Random, data: bytes, start: int = 0, end: int | None = None) -> bytes:
    """Flip, insert, delete, duplicate or truncate a few bytes in data[start:end]."""
    buf = bytearray(data)
    end = len(buf) if end is None else min(end, len(buf))
    for _ in range(rng.randint(1, 4)):
        if end <= start:
            break
        i = rng.randrange(start, end)
        action = rng.randrange(6)
        if action == 0:
            buf[i] ^= 1 << rng.randrange(8)
        elif action == 1:
            buf[i] = rng.choice(b'{}[]",:0123456789-eE.\\ \x00\xff')
        elif action == 2:
            buf.insert(i, rng.randrange(256))
        elif action == 3:
            del buf[i]
        elif action == 4:
            buf[i:i] = buf[i : i + rng.randint(1, 16)]
        else:
            del buf[i:]
            break
    return bytes(buf)


def mutate_json(rng: random.Random, obj: object) -> object:
    """Replace, delete or add one value somewhere in a JSON document."""
    path: list[object] = []
    node = obj
    while isinstance(node, dict | list) and node and rng.random() < 0.6:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]  # type: ignore[index]
    if not path:
        if isinstance(obj, dict):
            obj[rng.choice(["__metadata__", "n_layer", "architectures", "family", "w2"])] = random_value(rng)
        return obj
    parent = obj
    for key in path[:-1]:
        parent = parent[key]  # type: ignore[index]
    last = path[-1]
    if rng.random() < 0.15 and isinstance(parent, dict):
        del parent[last]
    else:
        parent[last] = random_value(rng)  # type: ignore[index]
    return obj


def safetensors_case(rng: random.Random, base: bytes) -> bytes:
    (length,) = struct.unpack("<Q", base[:8])
    header, data = base[8 : 8 + length], base[8 + length :]
    roll = rng.random()
    if roll < 0.45:
        header = json.dumps(mutate_json(rng, json.loads(header))).encode()
    elif roll < 0.9:
        header = mutate_bytes(rng, header)
    else:
        length = rng.choice([0, 7, length - 1, length + 1, len(base), 2**63, 2**64 - 1])
        return struct.pack("<Q", length) + header + data
    return struct.pack("<Q", len(header)) + header + data


def config_case(rng: random.Random, base: bytes) -> bytes:
    if rng.random() < 0.6:
        return json.dumps(mutate_json(rng, json.loads(base))).encode()
    return mutate_bytes(rng, base)


def gguf_case(rng: random.Random, base: bytes) -> bytes:
    """Mutations inside the first 4 KiB: the fixed header and the key-value metadata."""
    return mutate_bytes(rng, base, 0, 4096)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> dict[str, bytes]:
    from test_gguf import write_tiny_llama_gguf

    root = tmp_path_factory.mktemp("fuzz-inputs")
    save_file({"wte.weight": torch.randn(8, 4), "h.0.ln_1.bias": torch.zeros(4)}, root / "w.safetensors",
              metadata={"format": "pt"})
    write_tiny_llama_gguf(root / "tiny.gguf")
    return {
        "safetensors": (root / "w.safetensors").read_bytes(),
        "config": (gpt2_dir / "config.json").read_bytes(),
        "gguf": (root / "tiny.gguf").read_bytes(),
    }


def _prepare(kind: str, rng: random.Random, inputs: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":
        (folder / "w.json").write_bytes(inputs["config"])
        target = folder / "w.safetensors"
        target.write_bytes(safetensors_case(rng, inputs["safetensors"]))
    elif kind == "config":
        target = folder
        (folder / "model.safetensors").write_bytes(inputs["safetensors"])
        (folder / "config.json").write_bytes(config_case(rng, inputs["config"]))
    else:
        target = folder / "m.gguf"
        target.write_bytes(gguf_case(rng, inputs["gguf"]))
    return target


def run_cases(capsys: pytest.CaptureFixture[str], tmp_path: Path, inputs: dict[str, bytes], kind: str,
              seeds: range) -> dict[int, int]:
    outcomes: dict[int, int] = {}
    for seed in seeds:
        rng = random.Random(f"{kind}-{seed}")
        target = _prepare(kind, rng, inputs, tmp_path / f"{kind}-{seed}")
        try:
            result = zoo_cli(capsys, tmp_path / "zoo", "import", str(target), "--name", "fuzzed")
        except BaseException as e:  # anything escaping the CLI is a failure of its own kind
            pytest.fail(f"{kind} seed {seed}: {e.__class__.__name__} escaped the CLI: {e}")
        lines = [line for line in result.err.splitlines() if line.strip()]
        ok = result.code == 0 or (result.code == 2 and len(lines) == 1 and lines[0].startswith("error: "))
        assert ok and "Traceback" not in result.err, f"{kind} seed {seed}: exit {result.code}, stderr {result.err!r}"
        outcomes[result.code] = outcomes.get(result.code, 0) + 1
    return outcomes


SAMPLE = {"safetensors": 150, "config": 150, "gguf": 25}
FULL = {"safetensors": 1000, "config": 800, "gguf": 250}


@pytest.mark.parametrize("kind", sorted(SAMPLE))
def test_mutated_imports_succeed_or_fail_with_one_line(capsys, tmp_path, inputs, kind):
    outcomes = run_cases(capsys, tmp_path, inputs, kind, range(SAMPLE[kind]))
    assert outcomes.get(2, 0) > 0  # the mutator does reach the refusals it is meant to exercise


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(FULL))
def test_over_two_thousand_mutated_imports_succeed_or_fail_with_one_line(capsys, tmp_path, inputs, kind):
    outcomes = run_cases(capsys, tmp_path, inputs, kind, range(SAMPLE[kind], SAMPLE[kind] + FULL[kind]))
    assert sum(outcomes.values()) == FULL[kind]
