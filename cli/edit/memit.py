"""`zoo edit memit REF --requests FILE [--layers 4-8] [--stats-corpus FILE] [--method memit|alphaedit] [--z-batch N]`.

The statistics C are kept in the registry (derived tensors), keyed by the edited version's manifest hash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from modelzoo.cli.edit import edit_app
from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import console, emit, step_progress
from modelzoo.editors.lm_requests import FactRequest, load_requests, request_from_json
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import VersionInfo


def parse_layers(text: str) -> tuple[int, ...]:
    """"4-8" -> (4, 5, 6, 7, 8); "3,5,7" -> (3, 5, 7)."""
    try:
        if "-" in text.strip("-"):
            first, last = (int(x) for x in text.split("-", 1))
            return tuple(range(first, last + 1))
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise BadInput(f"--layers takes a range such as 4-8 or a list such as 4,6,8, not {text!r}") from None


def parse_hparams(pairs: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"--hparam takes key=value, not {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def gather_requests(requests: Path | None, prompt: str | None, subject: str | None, target_new: str | None,
                    target_true: str | None) -> tuple[FactRequest, ...]:
    one = [prompt, subject, target_new]
    if requests is not None and any(v is not None for v in one):
        raise BadInput("give either --requests FILE or --prompt/--subject/--target-new, not both")
    if requests is not None:
        return tuple(load_requests(requests))
    if any(v is None for v in one):
        raise BadInput("give --requests FILE, or one request as --prompt '{} is a' --subject S --target-new T")
    row = {"prompt": prompt, "subject": subject, "target_new": target_new, "target_true": target_true}
    return (request_from_json(row, "the request"),)


def _render(info: VersionInfo) -> None:
    m = info.metrics
    console.print(f"registered [bold]{info.ref}[/] ({info.method}, {m.get('edits')} facts, {m.get('edit_seconds')} s)")
    stats = m.get("stats", {})
    cached = sum(1 for s in stats.values() if s.get("cached"))
    console.print(f"statistics: {cached}/{len(stats)} layers from the cache; timings {m.get('timings_s')}")


@edit_app.command("memit")
def memit(
    ref: str,
    requests: Annotated[Path | None, typer.Option(help="JSON or JSONL file of CounterFact-form requests.")] = None,
    prompt: Annotated[str | None, typer.Option(help="One request: the prompt, {} where the subject goes.")] = None,
    subject: Annotated[str | None, typer.Option(help="One request: the subject.")] = None,
    target_new: Annotated[str | None, typer.Option(help="One request: the new object.")] = None,
    target_true: Annotated[str | None, typer.Option(help="One request: the current object (optional).")] = None,
    layers: Annotated[str | None, typer.Option(help="Edited layers, e.g. 4-8 (default: per architecture).")] = None,
    lam: Annotated[float | None, typer.Option(help="MEMIT's covariance weight lambda.")] = None,
    stats_corpus: Annotated[Path | None, typer.Option(help="Text (one document a line) or JSONL for C.")] = None,
    stats_samples: Annotated[int | None, typer.Option(help="Tokens behind the statistics C.")] = None,
    method: Annotated[str, typer.Option(help="memit or alphaedit.")] = "memit",
    z_batch: Annotated[int | None, typer.Option(help=(
        "Requests whose target vectors z are optimised together (1: one at a time, as the reference; "
        "default: all that fit in memory)."))] = None,
    hparam: Annotated[list[str] | None, typer.Option(help="Any hyperparameter, key=value (repeatable).")] = None,
    name: Annotated[str | None, typer.Option(help="Register the child under this model name.")] = None,
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Write facts into a language model with MEMIT (or AlphaEdit) and register the result."""
    from modelzoo.cli.main import State
    from modelzoo.editors.memit import MemitRequest

    if method not in ("memit", "alphaedit"):
        raise BadInput(f"--method is memit or alphaedit, not {method!r}")
    facts = gather_requests(requests, prompt, subject, target_new, target_true)
    zoo = State.zoo()
    info = zoo.get(ref)
    request = MemitRequest(
        requests=facts, layers=parse_layers(layers) if layers else None, lam=lam,
        stats_corpus=str(stats_corpus.resolve()) if stats_corpus else None, stats_samples=stats_samples,
        hparams=parse_hparams(hparam) | ({} if z_batch is None else {"z_batch": z_batch}),
    )
    with step_progress(f"{method} {info.ref}", quiet=as_json) as progress:
        child = zoo.edit(info.ref, method, request, name=name, device=device, dtype=dtype, progress=progress)
    emit(child, as_json, _render)
