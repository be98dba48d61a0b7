"""`zoo edit uce REF`: closed-form concept erasing, moderation and debiasing (UCE)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzoo.cli.edit import edit_app
from modelzoo.cli.edit._shared import READER_HELP, render_child, request_from, with_reader
from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import emit, step_progress


@edit_app.command("uce")
def uce(
    ref: str,
    erase: Annotated[list[str] | None, typer.Option(help="Concept to erase (repeatable).")] = None,
    target: Annotated[list[str] | None, typer.Option(help="Guide per erased concept (default '').")] = None,
    preserve: Annotated[list[str] | None, typer.Option(help="Concept to keep unchanged (repeatable).")] = None,
    debias: Annotated[list[str] | None, typer.Option(help="Prompt to debias, e.g. 'a circle' (repeatable).")] = None,
    attribute: Annotated[list[str] | None, typer.Option(help="Attribute to balance (repeatable, 2+).")] = None,
    ratio: Annotated[list[float] | None, typer.Option(help="Desired share per attribute; default equal.")] = None,
    mode: Annotated[str | None, typer.Option(help="erase | moderate | debias (default: debias with --debias).")] = None,
    template: Annotated[list[str] | None, typer.Option(help="Text holding '{}' for each concept (repeatable).")] = None,
    tokens: Annotated[str | None, typer.Option(help="last | last_and_following (default).")] = None,
    lam: Annotated[float | None, typer.Option(help="Regulariser towards the original weights (0.5).")] = None,
    erase_scale: Annotated[float | None, typer.Option(help="Weight of the edited concepts (1).")] = None,
    preserve_scale: Annotated[float | None, typer.Option(help="Weight of the preserved concepts (1).")] = None,
    preserve_mode: Annotated[str | None, typer.Option(help=(
        "penalty (UCE's own term, default) | nullspace (the change projected onto the null space of the "
        "preserved prompts' token embeddings: their outputs stay as they were)."))] = None,
    nullspace_threshold: Annotated[float | None, typer.Option(help=(
        "Null-space mode: eigenvalues below this fraction of the keys' mean squared norm count as null (1e-8)."
    ))] = None,
    layer: Annotated[list[str] | None, typer.Option(help="Edit only UNet modules containing this.")] = None,
    expand_prompts: Annotated[bool | None, typer.Option(help="Add the reference's five object templates.")] = None,
    reader: Annotated[str | None, typer.Option(help=f"Debias attribute reader: {READER_HELP}")] = None,
    max_iterations: Annotated[int | None, typer.Option(help="Debias iterations (30).")] = None,
    samples: Annotated[int | None, typer.Option(help="Debias images per prompt and iteration (10).")] = None,
    request: Annotated[Path | None, typer.Option(help="JSON file with any UceRequest fields.")] = None,
    name: Annotated[str | None, typer.Option(help="Register the child under this model name.")] = None,
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Edit cross-attention keys and values in closed form (UCE) and register the child version."""
    from modelzoo.cli.main import State
    from modelzoo.editors.uce import UceRequest

    if mode is None and debias:
        mode = "debias"
    req = request_from(UceRequest, request, {
        "erase": erase, "targets": target, "preserve": preserve, "debias": debias, "attributes": attribute,
        "ratios": ratio, "mode": mode, "templates": template, "tokens": tokens, "lam": lam,
        "erase_scale": erase_scale, "preserve_scale": preserve_scale, "preserve_mode": preserve_mode,
        "nullspace_threshold": nullspace_threshold, "layers": layer,
        "expand_prompts": expand_prompts, "reader": reader, "max_iterations": max_iterations,
        "samples_per_prompt": samples,
    }, "UCE request")
    zoo = State.zoo()
    if req.mode == "debias":
        req = with_reader(req, zoo, req.all_templates())
    with step_progress(f"uce {ref}", quiet=as_json) as progress:
        info = zoo.edit(ref, "uce", req, name=name, device=device, dtype=dtype, progress=progress)
    emit(info, as_json, render_child)

