"""Rendering for the CLI: JSON for scripts, rich tables and progress bars for people."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from modelzoo.registry.records import to_json

console = Console()
errors = Console(stderr=True)


class _ErrorsHandler(logging.Handler):
    """Log records as lines on the `errors` console, so that they print above a running progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            errors.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


_log_handler = _ErrorsHandler()
_log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
_only_modelzoo = logging.Filter("modelzoo")


def route_library_output(verbose: bool) -> None:
    """Send every warning through logging and show modelzoo's own; third-party warnings (Python warnings,
    the Hugging Face libraries' loggers) and those libraries' progress bars show only when `verbose`, which
    also shows modelzoo's info log."""
    root = logging.getLogger()
    if _log_handler not in root.handlers:
        root.addHandler(_log_handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("modelzoo").setLevel(logging.INFO if verbose else logging.NOTSET)
    if verbose:
        _log_handler.removeFilter(_only_modelzoo)
    else:
        _log_handler.addFilter(_only_modelzoo)
    logging.captureWarnings(True)  # before the imports below, which may warn

    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    for library in (transformers_logging, diffusers_logging):
        library.disable_default_handler()
        library.enable_propagation()
        (library.enable_progress_bar if verbose else library.disable_progress_bar)()
    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:  # its import-time default
        hub.removeHandler(handler)
    (hub_utils.enable_progress_bars if verbose else hub_utils.disable_progress_bars)()


def emit(record: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        print(json.dumps(to_json(record), indent=2, default=str))
    else:
        render(record)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    console.print(t)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError


@contextmanager
def byte_progress(label: str, quiet: bool = False) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar fed with (done, total) bytes; silent for --json output or non-terminals."""
    if quiet or not errors.is_terminal:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=errors, transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)

        yield update


@contextmanager
def step_progress(label: str, quiet: bool = False) -> Iterator[Callable[[int, int, dict[str, float]], None]]:
    """A bar for optimisation steps showing the latest figures (e.g. the loss); silent for --json output
    and when stderr is not a terminal. Fed with (steps done, total steps, figures)."""
    if quiet or not errors.is_terminal:
        yield lambda done, total, figures: None
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        "{task.fields[figures]}", console=errors, transient=True,
    ) as bar:
        task = bar.add_task(label, total=None, figures="")

        def update(done: int, total: int, figures: dict[str, float]) -> None:
            shown = " ".join(f"{k} {v:.4g}" for k, v in figures.items())
            bar.update(task, completed=done, total=total, figures=shown)

        yield update
