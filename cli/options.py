"""Options that several commands share, declared once so their names and help read the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

Device = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:N, or auto (CUDA when present).")]
Dtype = Annotated[str, typer.Option(
    help="Run in float32, bfloat16, float16 or float64; stored (the default) keeps the registry's dtype.")]
