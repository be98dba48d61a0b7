"""`zoo analyze circuit REF --desiderata FILE|NAME`: the components a task needs, found by desiderata-based
masks, with a lambda sweep drawn as a PNG (`zoo edit ablate REF --analysis ID` knocks them out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from modelzoo.analyses.circuit import CircuitRequest, desiderata_names, desiderata_path, read_desiderata
from modelzoo.analyses.circuit_plot import sweep_plot
from modelzoo.cli.analyze import Device, JsonFlag, _stages, _zoo, summary
from modelzoo.cli.output import console, emit, table
from modelzoo.registry.errors import BadInput


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BadInput(f"{what} takes comma-separated numbers, e.g. 0.05,0.1,0.2; got {text!r}") from None


def _render(r: dict[str, Any]) -> None:
    table(f"analysis {r['id']}: circuit of {r['ref']} ({r['component_count']} of {r['total_components']} "
          "components)", ["measure", "value"], [
              ["components", ", ".join(r["components"]) or "(none)"],
              ["task accuracy (clean)", f"{r['task_accuracy']:.2f} on {r['tested']} held-out prompts"],
              ["circuit mean-ablated", f"{r['ablated_accuracy']:.2f}"],
              ["random sets mean-ablated", f"{r['random_ablated_accuracy']:.2f}"],
              ["desiderata accuracy", f"{r['desiderata_accuracy']:.2f} (unpatched "
                                      f"{r['desiderata_accuracy_unpatched']:.2f}) on {r['tested_pairs']} pairs"],
          ])
    table("lambda sweep", ["lambda", "components", "desiderata accuracy"],
          [[f"{row['lambda']:g}", row["components"], f"{row['desiderata_accuracy']:.2f}"] for row in r["sweep"]])
    console.print(f"plot: {r['plot']}")


def register(analyze_app: typer.Typer) -> None:
    @analyze_app.command("circuit")
    def circuit(
        ref: str,
        desiderata: Annotated[str, typer.Option("--desiderata", help="A desiderata JSON file (format in the "
                                                f"README), or a shipped one: {', '.join(desiderata_names())}.")],
        lam: Annotated[float, typer.Option("--lambda", help="Sparsity penalty of the reported circuit.")] = 0.1,
        sweep: Annotated[str, typer.Option(help="More lambdas for the size/accuracy sweep ('' for none).")]
        = "0.02,0.05,0.2",
        steps: Annotated[int, typer.Option(help="Optimisation rounds (one step per desideratum each).")] = 100,
        lr: Annotated[float, typer.Option(help="Adam learning rate of the masks.")] = 1e-2,
        holdout: Annotated[float, typer.Option(help="Share of each desideratum's pairs held out for testing.")]
        = 0.5,
        random_sets: Annotated[int, typer.Option(help="Random component sets ablated as the baseline.")] = 5,
        seed: Annotated[int, typer.Option(help="Seed of the random sets' draw.")] = 0,
        png: Annotated[Path | None, typer.Option("--png", help="The sweep plot (default HOME/plots).")] = None,
        device: Device = "cpu",
        as_json: JsonFlag = False,
    ) -> None:
        """Components a task needs: masks trained so patching from counterfactual prompts meets the desiderata."""
        request = CircuitRequest(desiderata=read_desiderata(desiderata_path(desiderata)), source=desiderata,
                                 lam=lam, sweep=_floats(sweep, "--sweep"), steps=steps, lr=lr, holdout=holdout,
                                 random_sets=random_sets, seed=seed)
        request.split()
        zoo = _zoo()
        with _stages(as_json) as progress:
            info = zoo.analyze(ref, "circuit", request, device=device, progress=progress)
        path = png or zoo.settings.home / "plots" / f"circuit-sweep-{info.id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_plot(info.metrics["sweep"], f"circuit of {info.ref}: {desiderata}").save(path)
        emit({**summary(info), "plot": str(path)}, as_json, _render)
