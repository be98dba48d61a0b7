"""`zoo edit fv REF --analysis ID [--layer L] [--scale S] [--name NEW]`: a function vector in the weights."""

from __future__ import annotations

from typing import Annotated

import typer

from modelzoo.cli.edit import edit_app
from modelzoo.cli.output import console, emit
from modelzoo.editors.fv import FvBake
from modelzoo.registry.analyses import parse_analysis_id


@edit_app.command("fv")
def fv(
    ref: str,
    analysis: Annotated[str, typer.Option("--analysis", help="A stored fv analysis of REF (`zoo analyses REF`).")],
    layer: Annotated[int | None, typer.Option(help="Block whose output carries the vector; default: the "
                                                   "analysis's layer.")] = None,
    scale: Annotated[float, typer.Option(help="Multiple of the vector to add.")] = 1.0,
    name: Annotated[str | None, typer.Option(help="Model name for the child (default: REF's model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Register a child that adds a function vector after a block, at every position (an MLP bias)."""
    # Imported here, not at the top: main imports the edit commands to register them.
    from modelzoo.cli.main import State

    info = State.zoo().apply_function_vector(ref, FvBake(parse_analysis_id(analysis), layer, scale), name=name)
    emit(info, as_json, lambda i: console.print(
        f"registered [bold]{i.ref}[/]: analysis {i.params['analysis']}'s vector x{i.params['scale']} "
        f"after block {i.params['layer']} of {ref}"))


