"""`zoo edit ablate REF --analysis ID [--mode zero|mean] [--name NEW]`: a circuit knocked out in a child."""

from __future__ import annotations

from typing import Annotated

import typer

from modelzoo.cli.edit import edit_app
from modelzoo.cli.output import console, emit
from modelzoo.editors.ablate import Knockout
from modelzoo.registry.analyses import parse_analysis_id


@edit_app.command("ablate")
def ablate(
    ref: str,
    analysis: Annotated[str, typer.Option("--analysis", help="A stored circuit analysis of REF (`zoo analyses REF`).")],
    mode: Annotated[str, typer.Option(help="zero: the components output nothing; mean: their mean output "
                                           "(what the analysis's ablated accuracy measures).")] = "mean",
    name: Annotated[str | None, typer.Option(help="Model name for the child (default: REF's model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Register a child with a circuit's heads and MLPs knocked out at every position."""
    # Imported here, not at the top: main imports the edit commands to register them.
    from modelzoo.cli.main import State

    info = State.zoo().knock_out(ref, Knockout(parse_analysis_id(analysis), mode), name=name)  # type: ignore[arg-type]
    emit(info, as_json, lambda i: console.print(
        f"registered [bold]{i.ref}[/]: {len(i.params['components'])} components of analysis {i.params['analysis']} "
        f"knocked out ({i.params['mode']}) in {ref}: {', '.join(i.params['components'])}"))
