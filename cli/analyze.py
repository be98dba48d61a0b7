"""`zoo analyze KIND REF ...` computes an analysis and stores it with the version; `zoo analyses REF` lists
a version's analyses and `zoo analysis ID` shows one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from modelzoo.analyses.base import AnalysisProgress
from modelzoo.analyses.fv import FvRequest, read_pairs, task_names, task_path
from modelzoo.analyses.lre import LreRequest, read_facts
from modelzoo.cli.output import console, emit, errors, table
from modelzoo.registry.analyses import parse_analysis_id
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import AnalysisInfo

analyze_app = typer.Typer(help="Analyse a version; the result is stored with it (`zoo analyses REF`).",
                          no_args_is_help=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Device = Annotated[str, typer.Option(help="torch device, e.g. cuda.")]


def _zoo() -> Any:
    # Imported here, not at the top: main imports this module to register the commands.
    from modelzoo.cli.main import State

    return State.zoo()


def summary(info: AnalysisInfo) -> dict[str, Any]:
    """What `zoo analyze --json` prints: the analysis's id, kind and version, then its metrics."""
    return {"id": info.id, "kind": info.kind, "ref": info.ref, **info.metrics}


def _int_list(text: str | None, what: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"{what} takes comma-separated integers, e.g. 4,8,12; got {text!r}") from None


@contextmanager
def _stages(quiet: bool) -> Iterator[AnalysisProgress | None]:
    """One status line per stage on a terminal; nothing for --json or a pipe."""
    if quiet or not errors.is_terminal:
        yield None
        return
    with errors.status("analysing") as status:
        def update(stage: str, done: int, total: int) -> None:
            status.update(f"{stage} {done}/{total}")

        yield update


def _run(ref: str, kind: str, request: Any, device: str, as_json: bool,
         render: Callable[[dict[str, Any]], None]) -> None:
    with _stages(as_json) as progress:
        info = _zoo().analyze(ref, kind, request, device=device, progress=progress)
    emit(summary(info), as_json, render)


def _render_lre(r: dict[str, Any]) -> None:
    table(f"analysis {r['id']}: LRE of {r['relation']!r} in {r['ref']}", ["measure", "value"], [
        ["layer / beta / rank", f"{r['layer']} / {r['beta']} / {r['rank']}"],
        ["faithfulness", f"{r['faithfulness']:.2f} on {r['tested']} facts"],
        ["causality", f"{r['causality']:.2f} on {r['causality_tested']} pairs"],
        *[[f"baseline: {name}", f"{value:.2f}"] for name, value in r["baselines"].items()],
    ])


def _render_fv(r: dict[str, Any]) -> None:
    table(f"analysis {r['id']}: function vector in {r['ref']} (layer {r['layer']}, {len(r['heads'])} heads)",
          ["prompts", "without", "with the vector"], [
              ["zero-shot accuracy", f"{r['zero_shot']['base']:.2f}", f"{r['zero_shot']['fv']:.2f}"],
              ["zero-shot P(answer)", f"{r['zero_shot_p']['base']:.4f}", f"{r['zero_shot_p']['fv']:.4f}"],
              ["shuffled-label accuracy", f"{r['shuffled']['base']:.2f}", f"{r['shuffled']['fv']:.2f}"],
              ["in-context accuracy", f"{r['icl']:.2f}", ""],
          ])
    console.print(f"{r['tested']} test pairs; heads {r['heads']}")


@analyze_app.command("lre")
def lre(
    ref: str,
    facts: Annotated[Path, typer.Option("--facts", help="JSONL: relation, prompt ({} = subject), subject, "
                                                        "object (or a MEMIT request's target_true).")],
    relation: Annotated[str | None, typer.Option(help="The relation to fit, when the file holds several.")] = None,
    layer: Annotated[int | None, typer.Option(help="h's layer; default: swept on the training facts.")] = None,
    layers: Annotated[str | None, typer.Option(help="Candidate layers for the sweep, e.g. 4,8,12.")] = None,
    train: Annotated[int, typer.Option(help="Facts W and b are fitted on; the rest grade.")] = 8,
    device: Device = "cpu",
    as_json: JsonFlag = False,
) -> None:
    """Linear relational embedding of one relation: beta W h + b, faithfulness and causality."""
    request = LreRequest(facts=tuple(read_facts(facts)), relation=relation, layer=layer,
                         layers=_int_list(layers, "--layers"), train=train)
    _run(ref, "lre", request, device, as_json, _render_lre)


@analyze_app.command("fv")
def fv(
    ref: str,
    task: Annotated[str, typer.Option("--task", help=f"JSONL of input/output pairs, or a shipped task: "
                                                     f"{', '.join(task_names())}.")],
    test: Annotated[Path | None, typer.Option(help="Held-out pairs; default: the task's last 30%.")] = None,
    shots: Annotated[int, typer.Option(help="Examples per in-context prompt.")] = 10,
    heads: Annotated[int, typer.Option(help="Top heads by indirect effect summed into the vector.")] = 10,
    layer: Annotated[int | None, typer.Option(help="Where the vector is added; default: a third of the depth.")] = None,
    layers: Annotated[str | None, typer.Option(help="Candidate layers, chosen on training queries.")] = None,
    head_counts: Annotated[str | None, typer.Option(help="Candidate head counts, e.g. 5,10,20.")] = None,
    mean_trials: Annotated[int, typer.Option(help="Prompts averaged for each head's mean output.")] = 50,
    ie_trials: Annotated[int, typer.Option(help="Shuffled-label prompts for the indirect effects.")] = 25,
    seed: int = 0,
    device: Device = "cpu",
    as_json: JsonFlag = False,
) -> None:
    """Function vector of a task: top heads by causal indirect effect, their mean outputs summed."""
    request = FvRequest(task=tuple(read_pairs(task_path(task))), test=tuple(read_pairs(test)) if test else (),
                        shots=shots, heads=heads, layer=layer, layers=_int_list(layers, "--layers"),
                        head_counts=_int_list(head_counts, "--head-counts"), mean_trials=mean_trials,
                        ie_trials=ie_trials, seed=seed)
    _run(ref, "fv", request, device, as_json, _render_fv)


def _render_list(items: list[AnalysisInfo]) -> None:
    headline = ("faithfulness", "causality", "zero_shot", "zero_shot_p", "shuffled", "component_count",
                "task_accuracy", "ablated_accuracy")
    table(None, ["id", "kind", "version", "created", "metrics"], [
        [a.id, a.kind, a.ref, a.created_at.isoformat(timespec="seconds"),
         ", ".join(f"{k} {a.metrics[k]}" for k in headline if k in a.metrics)] for a in items])


def analyses(ref: str, kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
             as_json: JsonFlag = False) -> None:
    """The analyses stored with a version."""
    emit(_zoo().analyses(ref, kind), as_json, _render_list)


def analysis(analysis_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonFlag = False) -> None:
    """One stored analysis: parameters, metrics, tensors."""
    info = _zoo().analysis(parse_analysis_id(analysis_id))
    emit(info, as_json, lambda a: table(f"analysis {a.id}", ["field", "value"], [
        ["kind", a.kind], ["version", a.ref], ["created", a.created_at.isoformat(timespec="seconds")],
        ["params", a.params], ["metrics", a.metrics], ["input sha256", a.input_hash],
        ["tensors", ", ".join(a.tensors)], ["seconds", f"{a.duration_s:.1f}"]]))


def register(app: typer.Typer) -> None:
    app.add_typer(analyze_app, name="analyze")
    app.command("analyses")(analyses)
    app.command("analysis")(analysis)
