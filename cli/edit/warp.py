"""`zoo edit warp REF --request FILE.json [--layer L] [--rank R] [--iterations N] [--name NEW]`.

The request file is `WarpRequest`'s JSON, e.g. a horizontal stretch shown on five samples:

    {"samples": [{"seed": 0}, {"seed": 1}, {"seed": 2}, {"seed": 3}, {"seed": 4}], "transform": {"scale_x": 1.3}}

or control points per sample, `{"seed": 3, "points": [[xs, ys, xt, yt], ...]}`, as fractions of the image.
Flags override the file's keys.

Writes a before/after grid of unseen seeds (parent on top, child below) so a person can see whether the
warp carried over to samples the edit never saw. Every flag and the request file are checked, and the
grid's folder is known to be writable, before the (long) optimisation starts; bad input registers and
writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image

from modelzoo.cli.edit import edit_app
from modelzoo.cli.edit._shared import read_json_object
from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import console, emit, step_progress
from modelzoo.editors.warp import WarpRequest
from modelzoo.registry.errors import BadInput
from modelzoo.registry.paths import check_creatable_file
from modelzoo.registry.records import VersionInfo

MAX_SEED = 2**32
MIN_CELL = 128  # pixels per grid cell: a 32x32 sample is upscaled (nearest) so a person can see it
GAP = 4  # pixels of white between the parent row and the child row


@dataclass(frozen=True)
class WarpReport:
    """What `zoo edit warp --json` prints: the registered child and the before/after grid."""

    version: VersionInfo
    grid: str
    preview_seeds: list[int]


def preview_seeds(first: int, n: int, request: WarpRequest) -> list[int]:
    """Seeds for the grid; they must be unseen, or the grid would show the edit's own training samples."""
    if n < 1:
        raise BadInput(f"--preview-n must be at least 1, got {n}")
    if first < 0 or first + n > MAX_SEED:
        raise BadInput(f"preview seeds must lie in [0, 2**32): --preview-seed {first} --preview-n {n} does not")
    seeds = list(range(first, first + n))
    seen = sorted({s.seed for s in request.samples if s.seed is not None} & set(seeds))
    if seen:
        raise BadInput(f"preview seeds {seen} are in the request; choose --preview-seed so the grid shows unseen ones")
    return seeds


def before_after(parent: Sequence[np.ndarray], child: Sequence[np.ndarray]) -> Image.Image:
    """Two rows of uint8 images (H, W, 3): the parent's on top, the child's below, upscaled to MIN_CELL."""
    h, w = parent[0].shape[:2]
    k = max(1, -(-MIN_CELL // max(h, w)))
    sheet = Image.new("RGB", (len(parent) * w * k, 2 * h * k + GAP), "white")
    for row, images in enumerate((parent, child)):
        for col, im in enumerate(images):
            tile = Image.fromarray(im).resize((w * k, h * k), Image.Resampling.NEAREST)
            sheet.paste(tile, (col * w * k, row * (h * k + GAP)))
    return sheet


def _render(report: WarpReport) -> None:
    v = report.version
    m = v.metrics
    console.print(
        f"registered [bold]{v.ref}[/] (warp of {', '.join(p.ref for p in v.parents)}; layers {v.params.get('layers')}, "
        f"rank {v.params.get('rank')}, {v.params.get('iterations')} steps, {m.get('edit_seconds')} s)"
    )
    console.print(f"fit loss on the warped samples: {m.get('fit_loss_before')} -> {m.get('fit_loss_after')}")
    seeds = report.preview_seeds
    console.print(f"before/after grid of unseen seeds {seeds[0]}-{seeds[-1]} (parent on top): {report.grid}")


@edit_app.command("warp")
def warp(
    ref: str,
    request: Annotated[Path, typer.Option("--request", help="Warp request JSON: samples (seeds) and points.")],
    layer: Annotated[
        list[str] | None, typer.Option(help="Synthesis conv to update, name or index (repeatable).")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="Rank of the update (default 32).")] = None,
    iterations: Annotated[int | None, typer.Option(help="Optimisation steps (default 2000).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 1e-3).")] = None,
    loss: Annotated[str | None, typer.Option(help="mse (default), l1, or lpips where available offline.")] = None,
    name: Annotated[str | None, typer.Option(help="Register the child under this model name.")] = None,
    grid: Annotated[Path | None, typer.Option(help="Before/after PNG (default samples/NAME-vN-warp.png).")] = None,
    preview_seed: Annotated[int, typer.Option(help="First unseen seed shown in the grid.")] = 10_000,
    preview_n: Annotated[int, typer.Option(help="Number of unseen seeds in the grid.")] = 8,
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Warp a few samples of a GAN and rewrite the generator so that all its samples follow."""
    # Imported here, not at the top: main imports this package to register the command.
    from modelzoo.cli.main import State

    warp_request = WarpRequest.from_json(
        read_json_object(request, "warp request"), layers=tuple(layer) if layer else None, rank=rank,
        iterations=iterations, lr=lr, loss=loss,
    )
    seeds = preview_seeds(preview_seed, preview_n, warp_request)
    if grid is not None:
        check_creatable_file(grid, "--grid")
    zoo = State.zoo()
    info = zoo.get(ref)
    with step_progress(f"warp {info.ref}", quiet=as_json) as progress:
        child = zoo.edit(info.ref, "warp", warp_request, name=name, device=device, dtype=dtype, progress=progress)
    path = grid if grid is not None else Path("samples") / f"{child.model}-v{child.number}-warp.png"
    before = [s.image for s in zoo.sample(info.ref, seeds, device=device, dtype=dtype)]
    after = [s.image for s in zoo.sample(child.ref, seeds, device=device, dtype=dtype)]
    path.parent.mkdir(parents=True, exist_ok=True)
    before_after([im for im in before if im is not None], [im for im in after if im is not None]).save(path)
    emit(WarpReport(version=child, grid=str(path), preview_seeds=seeds), as_json, _render)
