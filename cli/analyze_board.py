"""`zoo analyze probe` and `zoo analyze intervene`: board-state probes of an Othello-GPT and interventions
that edit the board in its activations (`zoo demo othello` builds the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from modelzoo.cli.analyze import Device, JsonFlag, _stages, _zoo, summary
from modelzoo.cli.output import console, emit, table
from modelzoo.registry.analyses import parse_analysis_id
from modelzoo.registry.records import AnalysisInfo

Png = Annotated[Path | None, typer.Option("--png", help="Write a picture to this PNG file.")]
ProbePng = Annotated[Path | None, typer.Option("--png", help="With --layer: a test board beside the probe's reading. "
                                                       "With --sweep: the accuracy plot (default HOME/plots).")]


def _analyze(ref: str, kind: str, request: Any, device: str, quiet: bool) -> AnalysisInfo:
    with _stages(quiet) as progress:
        info: AnalysisInfo = _zoo().analyze(ref, kind, request, device=device, progress=progress)
    return info


def _render_probe(r: dict[str, Any]) -> None:
    if r.get("sweep"):
        table(f"analysis {r['id']}: probe sweep of {r['ref']} (accuracy / random model's)",
              ["layer", *[f"{k} {labels}" for k in ("linear", "mlp") for labels in ("mine-theirs", "black-white")]],
              [[layer, *[f"{c['accuracy']:.3f} / {c['baseline_accuracy']:.3f}" for c in r["table"]
                         if c["layer"] == layer]] for layer in sorted({c["layer"] for c in r["table"]})])
        return
    table(f"analysis {r['id']}: {r['kind']} {r['labels']} probe of {r['ref']} at layer {r['layer']}",
          ["model", "accuracy"], [["trained", f"{r['accuracy']:.3f}"],
                                  ["random init (baseline)", f"{r['baseline_accuracy']:.3f}"]])
    console.print("accuracy by layer (kept for interventions): "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in r["accuracy_by_layer"].items()))


def register(analyze_app: typer.Typer) -> None:
    @analyze_app.command("probe")
    def probe(
        ref: str,
        layer: Annotated[int | None, typer.Option(help="Read the residual stream after this block (from 0).")] = None,
        kind: Annotated[str, typer.Option(help="linear or mlp.")] = "linear",
        labels: Annotated[str, typer.Option(help="mine-theirs (the player to move's) or black-white.")] = "mine-theirs",
        sweep: Annotated[bool, typer.Option("--sweep", help="Every layer, both kinds, both label sets.")] = False,
        games: Annotated[int, typer.Option(help="New random games the probes are fitted on.")] = 200,
        test_games: Annotated[int, typer.Option(help="More new games that grade them.")] = 100,
        steps: Annotated[int, typer.Option(help="Adam steps per probe.")] = 300,
        seed: int = 0,
        png: ProbePng = None,
        device: Device = "cpu",
        as_json: JsonFlag = False,
    ) -> None:
        """Board-state probes: one 3-way classifier per square on the residual stream after a block."""
        from modelzoo.analyses.othello_board import BoardPanel, accuracy_plot, board_picture
        from modelzoo.analyses.probe import ProbeRequest

        request = ProbeRequest(layer=layer, kind=kind, labels=labels, sweep=sweep, games=games,
                               test_games=test_games, steps=steps, seed=seed)
        request.check()
        info = _analyze(ref, "probe", request, device, as_json)
        if sweep:
            path = png or _zoo().settings.home / "plots" / f"probe-sweep-{info.id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            accuracy_plot(info.metrics["table"], f"probes of {info.ref}").save(path)
            if not as_json:
                console.print(f"plot: {path}")
        elif png is not None:
            e = info.metrics["example"]
            wrong = [i for i, (a, b) in enumerate(zip(e["board"], e["probe"], strict=True)) if a != b]
            board_picture([BoardPanel(f"board after move {e['move']} of a test game", e["board"]),
                           BoardPanel(f"{kind} probe at layer {layer} (red: wrong)", e["probe"], (), wrong)]).save(png)
        # `kind` is the probe's (linear or mlp), as scripts read it; `analysis` says what the record is
        emit({**summary(info), "analysis": info.kind}, as_json, _render_probe)

    @analyze_app.command("intervene")
    def intervene(
        ref: str,
        probe_id: Annotated[str, typer.Option("--probe", metavar="ID", help="A probe of REF (`zoo analyses REF`).")],
        game: Annotated[str | None, typer.Option(help='The moves so far, e.g. "f5 d6 c3".')] = None,
        flip: Annotated[str | None, typer.Option(help="The square whose disc the edit turns over.")] = None,
        batch: Annotated[int, typer.Option(help="Run this many random interventions instead.")] = 0,
        seed: int = 0,
        threshold: Annotated[float, typer.Option(help="A move is predicted above this probability.")] = 0.01,
        steps: Annotated[int, typer.Option(help="Adam steps on each layer's residual.")] = 1000,
        lr: float = 1e-3,
        png: Png = None,
        device: Device = "cpu",
        as_json: JsonFlag = False,
    ) -> None:
        """Edit the board the probe reads (from its layer upward) and compare the model's legal moves."""
        from modelzoo.analyses.othello_board import BoardPanel, board_picture
        from modelzoo.analyses.othello_intervene import InterveneRequest, load_probe
        from modelzoo.demo.othello import SQUARE_INDEX, parse_game

        stored = load_probe(_zoo().registry, ref, parse_analysis_id(probe_id))
        request = InterveneRequest(probe=stored, game=tuple(parse_game(game or "")), flip=flip, batch=batch,
                                   seed=seed, threshold=threshold, steps=steps, lr=lr)
        request.check()
        info = _analyze(ref, "intervene", request, device, as_json)
        if png is not None:
            e = info.metrics["example"]
            flipped = [SQUARE_INDEX[e["flip"]]]

            def at(names: list[str]) -> list[int]:
                return [SQUARE_INDEX[n] for n in names]

            board_picture([
                BoardPanel("board (dots: legal moves)", e["board_before"], at(e["legal_before"])),
                BoardPanel(f"probe at layer {stored.layer} (dots: predicted)", e["probe_before"],
                           at(e["predicted_before"])),
                BoardPanel(f"{e['flip']} flipped (dots: legal moves)", e["board_after"], at(e["legal_after"]), flipped),
                BoardPanel("probe after the edit (dots: predicted)", e["probe_after"], at(e["predicted_after"]),
                           flipped),
            ]).save(png)
        emit({**summary(info), "analysis": info.kind}, as_json, _render_intervene)


def _render_intervene(r: dict[str, Any]) -> None:
    e = r["example"]
    if r["count"] == 1:
        table(f"analysis {r['id']}: {e['game']}, flip {e['flip']} (probe {r['probe']}, layer {r['layer']} up)",
              ["", "true legal moves", "model predicts"], [
                  ["before", " ".join(e["legal_before"]), " ".join(e["predicted_before"])],
                  ["after the flip", " ".join(e["legal_after"]), " ".join(e["predicted_after"])]])
    table(f"analysis {r['id']}: {r['count']} interventions from layer {r['layer']} (probe {r['probe']})",
          ["measure", "value"], [
              ["error after the intervention", f"{r['error']:.2f}"],
              ["error without it (baseline)", f"{r['baseline_error']:.2f}"],
              ["probe reads the edited board", f"{r['probe_reads_edit']:.2f}"],
          ])
