"""Run the `zoo` CLI in-process and snapshot a registry, to prove bad input changes nothing."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelzoo.cli.main import run


@dataclass
class Result:
    code: int
    out: str
    err: str


def zoo_cli(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> Result:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(["--home", str(home), *args])
    captured = capsys.readouterr()
    code = exit_info.value.code
    return Result(code if isinstance(code, int) else (0 if code is None else 1), captured.out, captured.err)


def snapshot(home: Path) -> tuple[list[str], list[tuple[str, bytes]]]:
    """Every row of every table, and every file under the home (with content)."""
    with sqlite3.connect(home / "registry.db") as conn:
        rows = list(conn.iterdump())
    files = sorted((str(p.relative_to(home)), p.read_bytes()) for p in home.rglob("*")
                   if p.is_file() and not p.name.startswith("registry.db"))
    return rows, files
