"""The analysis plugin interface: a loaded version and a typed request in, a `NewAnalysis` out.

Analyzers never write to the registry: `run_analysis` checks the request, loads the version, runs the
analyzer and stores what it returns, so an analysis that fails or is interrupted stores nothing.
Analyzers are registered under the entry-point group `modelzoo.analyses` (kind -> class), so a third
party can add one without touching this repository.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from modelzoo.registry.analyses import NewAnalysis, store_analysis
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import LoadedModel, get_family
from modelzoo.registry.records import AnalysisInfo
from modelzoo.registry.store import Registry
from modelzoo.registry.untrusted import parse_json

AnalysisProgress = Callable[[str, int, int], None]
"""Called with (stage, done, total) as an analysis works through its stages."""

MAX_LINES = 100_000


@runtime_checkable
class Analyzer(Protocol):
    kind: ClassVar[str]  # stored as the analysis's kind, e.g. "lre"
    families: ClassVar[tuple[str, ...]]  # the model families it can analyse

    def check(self, request: Any) -> None:
        """Raise BadInput for a request that cannot work, before any model is loaded."""
        ...

    def analyze(self, model: LoadedModel, request: Any, progress: AnalysisProgress | None = None) -> NewAnalysis:
        """Compute the analysis of `model` (left unchanged)."""
        ...


def report(progress: AnalysisProgress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def analysis_kinds() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="modelzoo.analyses"))


def get_analyzer(kind: str) -> Analyzer:
    found = [ep for ep in entry_points(group="modelzoo.analyses") if ep.name == kind]
    if not found:
        raise BadInput(f"unknown analysis {kind!r}; installed: {', '.join(analysis_kinds())}")
    analyzer: Analyzer = found[0].load()()
    return analyzer


def run_analysis(registry: Registry, ref: str, kind: str, request: Any, *, device: str = "cpu",
                 progress: AnalysisProgress | None = None) -> AnalysisInfo:
    analyzer = get_analyzer(kind)
    info = registry.info(ref)
    if info.family not in analyzer.families:
        raise BadInput(f"{info.ref} is a {info.family} model; {kind} analyses {', '.join(analyzer.families)} models")
    analyzer.check(request)
    model = get_family(info.family).load(registry, info.ref, device)
    started = time.perf_counter()
    new = analyzer.analyze(model, request, progress)
    return store_analysis(registry, info.ref, replace(new, duration_s=time.perf_counter() - started))


def shipped_names(directory: Path, suffix: str) -> list[str]:
    """The names of the files with `suffix` that ship in `directory`."""
    return sorted(p.stem for p in directory.glob(f"*{suffix}"))


def shipped_or_path(name_or_path: str, directory: Path, suffix: str) -> Path:
    """A path as given, or the shipped file of that name; an existing path wins over a name."""
    path = Path(name_or_path)
    if path.exists() or name_or_path not in shipped_names(directory, suffix):
        return path
    return directory / f"{name_or_path}{suffix}"


def read_json_lines(path: Path) -> list[Any]:
    """One JSON value per non-empty line of an untrusted file; BadInput naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for _, line in zip(range(MAX_LINES + 1), f, strict=False)]
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not UTF-8 text") from None
    if len(lines) > MAX_LINES:
        raise BadInput(f"{path} has more than {MAX_LINES} lines")
    return [parse_json(line, f"{path}:{i + 1}") for i, line in enumerate(lines) if line.strip()]
