"""`zoo index` and `zoo search`: content-based search over the versions' samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import console, emit, errors, table
from modelzoo.registry.errors import BadInput
from modelzoo.search.engine import SearchHit
from modelzoo.search.indexer import DEFAULT_COMPONENTS, DEFAULT_RANK, DEFAULT_SAMPLES, IndexedVersion


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("search")(search)


def _pairs(pairs: list[str] | None) -> dict[str, str]:
    from modelzoo.cli.main import parse_pairs  # noqa: PLC0415 (main imports this module)

    return parse_pairs(pairs)


def index(
    refs: Annotated[list[str] | None, typer.Argument(help="Versions to index (default: every live version).")] = None,
    encoder: Annotated[str | None, typer.Option(help="zoo:REF, open_clip:ARCH:TAG|PATH, or a CLIP folder.")] = None,
    samples: Annotated[int, typer.Option(help="Samples per version.")] = DEFAULT_SAMPLES,
    prompt: Annotated[list[str] | None, typer.Option(help="Prompt for diffusion/LM sampling (repeatable).")] = None,
    prompts_file: Annotated[Path | None, typer.Option("--prompts", help="A file of prompts, one per line.")] = None,
    rank: Annotated[int, typer.Option(help="Covariance eigenpairs kept (plus the diagonal).")] = DEFAULT_RANK,
    components: Annotated[int, typer.Option(
        help="Most mixture components per version, K chosen by held-out likelihood (1: one Gaussian); prompted "
             "models get one per prompt.")] = DEFAULT_COMPONENTS,
    rebuild: Annotated[bool, typer.Option(
        help="Sample indexed versions again with their stored spec and replace their moments.")] = False,
    steps: Annotated[int | None, typer.Option(help="Denoising steps for diffusion sampling.")] = None,
    seed: Annotated[int, typer.Option(help="First seed.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples drawn per call.")] = 32,
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Sample and embed versions and store their moments; already indexed versions are skipped."""
    from modelzoo.cli.main import State  # noqa: PLC0415

    prompts = list(prompt or [])
    if prompts_file is not None:
        try:
            prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"cannot read prompts file {prompts_file}: {e}") from None
    options = {} if steps is None else {"steps": steps}
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=errors, transient=True, disable=as_json or not errors.is_terminal,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(ref: str, done: int, total: int) -> None:
            if ref not in tasks:
                tasks[ref] = bar.add_task(f"indexing {ref}", total=total)
            bar.update(tasks[ref], completed=done)

        done = State.zoo().index(
            refs or None, encoder=encoder, samples=samples, prompts=prompts or None, rank=rank, first_seed=seed,
            options=options, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
            components=components, rebuild=rebuild,
        )
    emit(done, as_json, _render_index)


def _render_index(done: list[IndexedVersion]) -> None:
    fresh = [d for d in done if not d.skipped]
    rows = [[d.ref, d.samples, d.components, f"{d.seconds:.1f}s", d.thumbnail] for d in fresh]
    if rows:
        table("indexed", ["version", "samples", "components", "time", "thumbnail"], rows)
    console.print(f"{len(fresh)} indexed, {len(done) - len(fresh)} already up to date")


def search(
    text: Annotated[list[str] | None, typer.Option(help="Text query (repeatable).")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="Image file query (repeatable).")] = None,
    sketch: Annotated[list[Path] | None, typer.Option(help="Sketch image file query (repeatable).")] = None,
    like: Annotated[list[str] | None, typer.Option(help="Find models like this version (repeatable).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Number of results.")] = 10,
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="Only versions with key=value (repeatable).")] = None,
    modality: Annotated[str | None, typer.Option(
        help="Rank image generators (image) or language models (text); default: image, text under --family lm, "
             "a --like model's own.")] = None,
    summary: Annotated[str, typer.Option(
        help="Score each version's mixture, or its single Gaussian (the Modelverse paper's).")] = "mixture",
    encoder: Annotated[str | None, typer.Option(help="Encoder spec (default: the one indexed).")] = None,
    device: Annotated[str, typer.Option(help="torch device for encoding the query.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Find versions by what they generate: text, image, sketch, another model, or several at once."""
    from modelzoo.cli.main import State  # noqa: PLC0415

    hits = State.zoo().search(
        text=text or (), image=image or (), sketch=sketch or (), like=like or (), top_k=top_k, family=family,
        tags=_pairs(tag), encoder=encoder, device=device, modality=modality, summary=summary,
    )
    if as_json:
        print(json.dumps([hit_json(h) for h in hits], indent=2))
    else:
        _render_hits(hits)


def hit_json(hit: SearchHit) -> dict[str, object]:
    return {
        "rank": hit.rank, "ref": hit.ref, "model": hit.model, "version": hit.version, "family": hit.family,
        "modality": hit.modality, "score": hit.score, "scores": hit.scores, "thumbnail": hit.thumbnail,
    }


def _render_hits(hits: list[SearchHit]) -> None:
    if not hits:
        console.print("no match")
        return
    table(None, ["rank", "version", "family", "modality", "score", "thumbnail"],
          [[h.rank, h.ref, h.family, h.modality, f"{h.score:.3f}", h.thumbnail] for h in hits])
