"""`zoo eval facts REF --requests FILE [--json]`: CounterFact's efficacy, paraphrase and neighborhood scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import emit, table
from modelzoo.editors.lm_eval import FactScores, fact_scores
from modelzoo.editors.lm_requests import load_requests
from modelzoo.registry.errors import BadInput

eval_app = typer.Typer(help="Measure a version against a benchmark.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@dataclass(frozen=True)
class FactReport:
    ref: str
    scores: FactScores


def _render(report: FactReport) -> None:
    s = report.scores
    skipped = f" ({s.neighbors_skipped} neighbours left out: this file rewrites them)" if s.neighbors_skipped else ""
    table(f"{report.ref}: {s.requests} facts, {s.prompts} prompts{skipped}",
          ["efficacy", "paraphrase", "neighborhood", "score"],
          [[s.efficacy, s.paraphrase, s.neighborhood, s.score]])


@eval_app.command("facts")
def facts(
    ref: str,
    requests: Annotated[Path, typer.Option(help="JSON or JSONL file of CounterFact-form requests.")],
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Does the version prefer each request's new target (on its prompt and paraphrases) and keep its
    neighbours' true answers? Probability comparisons as in CounterFact; the score is their harmonic mean."""
    from modelzoo.cli.main import State

    facts = load_requests(requests)
    zoo = State.zoo()
    info = zoo.get(ref)
    if info.family != "lm":
        raise BadInput(f"{info.ref} is a {info.family} model; zoo eval facts measures language models")
    model = zoo.load(info.ref, device, dtype)
    if model.tokenizer is None:
        raise BadInput(f"{info.ref} has no tokenizer to read the requests' text with")
    emit(FactReport(info.ref, fact_scores(model.pipeline, model.tokenizer, facts)), as_json, _render)
