"""`zoo compose REF_A REF_B [REF ...] --name NEW [--scale S ...]`: add the weight deltas of edits of one parent."""

from __future__ import annotations

from typing import Annotated

import typer

from modelzoo.cli.output import console, emit
from modelzoo.registry.records import VersionInfo


def _render(info: VersionInfo) -> None:
    parents = ", ".join(p.ref for p in info.parents)
    console.print(
        f"registered [bold]{info.ref}[/]: {parents} composed on {info.params.get('parent')} "
        f"(scales {info.params.get('scales')}, {info.metrics.get('tensors')} tensors changed)"
    )


def compose(
    refs: Annotated[list[str], typer.Argument(help="Two or more edited versions of the same parent.")],
    name: Annotated[str, typer.Option("--name", help="Model name for the composed version.")],
    scale: Annotated[
        list[float] | None, typer.Option(help="Weight s_k in [0, 1] of each edit's delta, in order (default 1).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Compose edits that share a parent: W = W_parent + sum_k s_k (W_k - W_parent), all of them as parents."""
    # Imported here, not at the top: main imports this module to register the command.
    from modelzoo.cli.main import State

    info = State.zoo().compose(refs, name=name, scales=scale)
    emit(info, as_json, _render)


def register(app: typer.Typer) -> None:
    app.command("compose")(compose)
