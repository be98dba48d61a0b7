"""`zoo edit esd REF`: erase a concept by fine-tuning with negative guidance (ESD)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelzoo.cli.edit import edit_app
from modelzoo.cli.edit._shared import READER_HELP, render_child, request_from, with_reader
from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import emit, step_progress


@edit_app.command("esd")
def esd(
    ref: str,
    erase: Annotated[list[str] | None, typer.Option(help="Concept to erase (repeatable; one drawn per step).")] = None,
    template: Annotated[list[str] | None, typer.Option(
        help="Text holding '{}' for the concept, e.g. 'a {} circle' (repeatable; one drawn per step).")] = None,
    preserve: Annotated[list[str] | None, typer.Option(
        help="Concept to keep as the original draws it (repeatable; not in the paper).")] = None,
    train_method: Annotated[str | None, typer.Option(help="xattn | noxattn | selfattn | full | strict.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Optimisation steps (1000).")] = None,
    eta: Annotated[float | None, typer.Option(help="Negative guidance scale (1).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (1e-5).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per step (1).")] = None,
    ddim_steps: Annotated[int | None, typer.Option(help="DDIM steps of the x_t sampler (50).")] = None,
    start_guidance: Annotated[float | None, typer.Option(help="Guidance of the x_t sampler (3).")] = None,
    sampler: Annotated[str | None, typer.Option(help="frozen | edited (paper): which model draws x_t.")] = None,
    until: Annotated[float | None, typer.Option(
        help="Stop once the concept's pull on held-out x_t falls to this fraction of the original's.")] = None,
    check_every: Annotated[int | None, typer.Option(help="Iterations between measurements of the pull (25).")] = None,
    read_until: Annotated[float | None, typer.Option(help=(
        "Stop once at most this share of images drawn for the erased concepts reads as them (needs --preserve: "
        "the reader chooses among erased and preserved)."))] = None,
    read_every: Annotated[int | None, typer.Option(help="Iterations between two readings (100).")] = None,
    read_images: Annotated[int | None, typer.Option(help="Images per erased text at each reading (16).")] = None,
    reader: Annotated[str | None, typer.Option(help=f"Image reader for --read-until: {READER_HELP}")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the noise and the drawn steps.")] = None,
    request: Annotated[Path | None, typer.Option(help="JSON file with any EsdRequest fields.")] = None,
    name: Annotated[str | None, typer.Option(help="Register the child under this model name.")] = None,
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Fine-tune the UNet away from a concept (ESD) and register the child version; Ctrl-C registers nothing."""
    from modelzoo.cli.main import State
    from modelzoo.editors.esd import EsdRequest

    req = request_from(EsdRequest, request, {
        "erase": erase, "templates": template, "preserve": preserve, "train_method": train_method,
        "iterations": iterations, "eta": eta, "lr": lr, "batch_size": batch_size, "ddim_steps": ddim_steps,
        "start_guidance": start_guidance, "sampler": sampler, "until": until,
        "check_every": check_every, "read_until": read_until, "read_every": read_every, "read_images": read_images,
        "reader": reader, "seed": seed,
    }, "ESD request")
    zoo = State.zoo()
    if req.read_until is not None:
        req = with_reader(req, zoo, req.templates)
    with step_progress(f"esd {ref}", quiet=as_json) as progress:
        info = zoo.edit(ref, "esd", req, name=name, device=device, dtype=dtype, progress=progress)
    emit(info, as_json, render_child)
