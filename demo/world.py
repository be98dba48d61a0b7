"""The shapes world, built into a registry: every model trained here, registered with provenance
(`method=train`, data slice, seed, profile, code version) and its measured quality as metrics.

Builds are cached in the registry itself: a model whose version carries the same build key (a hash of
the world's code, the profile, the seed and the model's name) is reused, not retrained. Training is
seeded, so a rebuild from scratch gives the same weights on the same machine.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import modelzoo
from modelzoo.registry.formats import read_source
from modelzoo.registry.importer import register_source
from modelzoo.registry.queries import ListFilter

log = logging.getLogger(__name__)
Progress = Callable[[str, float], None]  # (what is happening, fraction done of that model)
BUILD_TAG = "world-build"
PROFILES = ("quick", "full")


@dataclass(frozen=True)
class WorldModel:
    """One model of the world: how to train it into a native folder, and what quality it must reach."""

    name: str
    train: Callable[[Path, int, str, Callable[[int, int, float], None] | None], dict[str, Any]]
    params: dict[str, Any]
    thresholds: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class BuiltModel:
    name: str
    ref: str
    family: str
    metrics: dict[str, Any]
    thresholds: dict[str, float]
    reused: bool
    seconds: float


def code_version() -> str:
    """A hash of the code that decides what the world's models are: change it and the world rebuilds.

    The trainers, their data and meters, the catalog and the family adapters count; code that only uses
    the world (search evaluation, fact sets for the editors) does not."""
    here = Path(__file__).resolve().parent
    families = here.parent / "registry" / "families"
    own = [here / name for name in ("shapes.py", "meters.py", "facts.py", "catalog.py", "world.py")]
    sources = sorted(own + list(here.glob("train_*.py"))) + sorted(families.glob("*.py"))
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build_key(model: WorldModel, profile: str, seed: int) -> str:
    return hashlib.sha256(f"{code_version()}:{profile}:{seed}:{model.name}".encode()).hexdigest()[:16]


def build_world(
    zoo: modelzoo.Zoo,
    models: list[WorldModel],
    profile: str,
    seed: int,
    progress: Progress | None = None,
) -> list[BuiltModel]:
    built = []
    for model in models:
        key = build_key(model, profile, seed)
        existing = [m for m in zoo.list(ListFilter(tags={BUILD_TAG: key})) if m.name == model.name]
        if existing:
            info = zoo.get(f"{model.name}@{existing[0].matching_versions[-1]}")
            built.append(BuiltModel(model.name, info.ref, info.family, info.metrics, model.thresholds, True, 0.0))
            continue
        started = time.perf_counter()

        def report(step: int, total: int, loss: float, name: str = model.name) -> None:
            if progress:
                progress(f"training {name} (loss {loss:.3f})", step / max(total, 1))

        with tempfile.TemporaryDirectory(prefix="zoo-world-") as tmp:
            out = Path(tmp) / model.name
            metrics = model.train(out, seed, profile, report)
            if progress:
                progress(f"registering {model.name}", 1.0)
            source = read_source(out)
            info = register_source(
                zoo.registry, source, model.name, method="train",
                params={**model.params, "seed": seed, "profile": profile, "code_version": code_version()},
                metrics=metrics, tags={**model.tags}, description=model.description,
            )
        zoo.tag(info.ref, BUILD_TAG, key)
        built.append(BuiltModel(model.name, info.ref, info.family, metrics, model.thresholds, False,
                                time.perf_counter() - started))
    return built
