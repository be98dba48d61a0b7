"""`zoo demo [--quick]`: build (or reuse) the offline shapes world in the registry, then show what
modelzoo does with it: a sample grid per model, every model's measured quality against its bar, and
lineage. Everything runs offline on models trained here."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from PIL import Image
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from modelzoo.cli.output import console, errors, table
from modelzoo.registry.errors import BadInput, NotFound
from modelzoo.registry.records import VersionInfo


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        world: Annotated[str, typer.Argument(help="shapes, or othello: Othello-GPT and its board.")] = "shapes",
        quick: Annotated[bool, typer.Option("--quick", help="A smaller world in about a minute (for tests).")] = False,
        seed: Annotated[int, typer.Option(help="Seed of the whole world; builds are cached per seed.")] = 0,
        out: Annotated[Path | None, typer.Option(help="Folder for the sample grids (default HOME/demo).")] = None,
    ) -> None:
        """Build the offline shapes world (or Othello-GPT) and show what modelzoo does with it."""
        from modelzoo.cli.main import State
        from modelzoo.demo.catalog import world_models
        from modelzoo.demo.world import build_world

        if world not in ("shapes", "othello"):
            raise BadInput(f"unknown demo world {world!r}: shapes or othello")
        started = time.perf_counter()
        zoo = State.zoo()
        if zoo.list():
            report = zoo.verify()
            if not report.ok:
                raise BadInput(f"the registry at {zoo.settings.home} has damaged blobs; run `zoo verify` first")
        profile = "quick" if quick else "full"
        if world == "othello":
            show_othello(zoo, profile, seed)
            return
        models = world_models(profile)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=errors,
                      transient=True, disable=not errors.is_terminal) as bar:
            task = bar.add_task("building the shapes world", total=len(models))
            done: list[str] = []

            def progress(what: str, fraction: float) -> None:
                bar.update(task, description=what, completed=len(done) + min(fraction, 0.999))

            built = []
            for model in models:
                built += build_world(zoo, [model], profile, seed, progress)
                done.append(model.name)
        console.print(f"[bold]shapes world ({profile})[/]: {len(built)} models in the registry at {zoo.settings.home}")

        grids = out or zoo.settings.home / "demo"
        grids.mkdir(parents=True, exist_ok=True)
        for b in built:
            path = write_grid(zoo, b.ref, b.family, grids, per_prompt=1 if quick else 2)
            if path:
                console.print(f"  samples of {b.ref}: {path}")

        table(
            "measured quality",
            ["model", "version", "metric", "value", "bar", "ok", "trained"],
            [[b.name, b.ref, k, _fmt(b.metrics.get(k)), _fmt(v), "yes" if float(b.metrics.get(k, -1)) >= v else "NO",
              "cached" if b.reused else f"{b.seconds:.0f}s"]
             for b in built for k, v in b.thresholds.items()],
        )
        show_search(zoo, built, profile, seed)
        edited = show_edit(zoo, built, quick)
        show_debias(zoo, next(b.ref for b in built if b.family == "diffusion"), quick)
        show_fact_edit(zoo, built)
        lineage = zoo.lineage(edited)
        parents = ", ".join(f"{a.ref} ({a.relation}, {a.method})" for a in lineage.ancestors)
        console.print(f"lineage of {lineage.ref}: ancestors {parents or 'none'} (`zoo lineage {lineage.ref}`)")
        console.print(f"done in {time.perf_counter() - started:.0f}s. Next: `zoo list`, `zoo show {built[0].ref}`, "
                      f"`zoo sample {built[-1].ref} --n 8 --grid grid.png`")


def show_othello(zoo, profile: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Train (or reuse) Othello-GPT with a progress bar, then show its legal-move rate and its curve."""
    from modelzoo.demo.othello_gpt import world_model
    from modelzoo.demo.world import build_world

    model = world_model(profile)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=errors,
                  transient=True, disable=not errors.is_terminal) as bar:
        task = bar.add_task("training othello-gpt", total=1.0)
        (built,) = build_world(zoo, [model], profile, seed,
                               lambda what, fraction: bar.update(task, description=what, completed=fraction))
    m = built.metrics
    table(f"{built.ref}: {'reused' if built.reused else f'trained in {built.seconds:.0f}s'} on {m['games_seen']:,} "
          f"games ({m['parameters']:,} parameters)", ["measure", "value", "bar"], [
              ["top-1 legal-move rate", f"{m['legal_top1']:.3f} on {m['eval_games']} new games",
               f"{model.thresholds['legal_top1']}"],
              ["worst move number", f"{m['legal_top1_worst_move']:.3f}", ""],
              ["loss (a perfect model's)", f"{m['loss']:.3f} ({m['loss_floor']:.3f})", ""]])
    table("legal-move rate against games seen", ["games seen", "top-1 legal"],
          [[f"{games:,}", f"{rate:.3f}"] for games, rate in m["curve"]])
    console.print(f"Next: `zoo analyze probe {built.ref} --sweep`, then "
                  f"`zoo analyze intervene {built.ref} --probe ID --batch 100`")


def show_search(zoo, built, profile: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Index the world's generators with its CLIP, run a text and an image search, measure retrieval."""
    from modelzoo.demo.catalog import FULL_GAN_SLICES, QUICK_GAN_SLICES
    from modelzoo.demo.search_eval import index_world, retrieval
    from modelzoo.demo.shapes import ShapeSpec, draw

    started = time.perf_counter()
    by_family: dict[str, list[str]] = {}
    for b in built:
        by_family.setdefault(b.family, []).append(b.ref)
    fresh = [d for d in index_world(zoo, by_family, profile) if not d.skipped]
    console.print(f"indexed {len(fresh)} versions with the shapes CLIP in {time.perf_counter() - started:.0f}s "
                  f"(`zoo index`)")
    for label, kwargs in [
        ('zoo search --text "a red circle"', {"text": ["a red circle"]}),
        ("zoo search --image <a new red circle>", {"image": [draw(ShapeSpec("circle", "red", 0.5, 0.5, 0.6))]}),
    ]:
        hits = zoo.search(top_k=3, **kwargs)
        console.print(f"{label}: " + ", ".join(f"{h.rank}. {h.ref} ({h.score:.1f})" for h in hits))
    slices = FULL_GAN_SLICES if profile == "full" else QUICK_GAN_SLICES
    rows = []
    for among, family in (("the GANs", "gan"), ("all image models", None)):
        for summary in ("gaussian", "mixture"):
            report = retrieval(zoo, slices, seed, family=family, summary=summary)
            rows += [[among, report["models_indexed"], summary, kind, r["queries"], f"{r['top1']:.2f}",
                      f"{r['top5']:.2f}", f"{r['mAP']:.2f}"]
                     for kind, r in report.items() if isinstance(r, dict)]
    table(f"search on the shapes world: is each of the {len(slices)} slices' GAN found?",
          ["among", "models", "summary", "query", "queries", "top-1", "top-5", "mAP"], rows)


def show_edit(zoo, built, quick: bool) -> str:  # type: ignore[no-untyped-def]
    """Erase a colour from the diffusion model with UCE and measure it with the colour meter: the erased
    colour's share falls, the others stay. The child is an ordinary registered version with lineage."""
    from modelzoo.demo.meters import colours_of
    from modelzoo.demo.shapes import BASIC_COLOURS, SHAPES
    from modelzoo.editors.uce import UceRequest

    sd = next(b.ref for b in built if b.family == "diffusion")
    erased, others = "blue", tuple(c for c in BASIC_COLOURS if c != "blue")
    request = UceRequest(erase=(erased,), preserve=others, templates=tuple(f"a {{}} {s}" for s in SHAPES))
    name = f"{sd.split('@')[0]}-no-{erased}"
    child = _earlier_edit(zoo, name, sd) or zoo.edit(sd, "uce", request, name=name)
    n = 8 if quick else 32

    def share(ref: str, colour: str) -> float:
        images = np.stack([s.image for s in zoo.sample(ref, range(n), f"a {colour} circle", steps=20, batch_size=n)])
        return float(np.mean([c == colour for c in colours_of(images)]))

    rows = [[colour, f"{share(sd, colour):.2f}", f"{share(child.ref, colour):.2f}"] for colour in BASIC_COLOURS]
    table(f"zoo edit uce {sd} --erase {erased} --preserve ...  ->  {child.ref} ({child.added_bytes:,} bytes added)",
          ["prompt colour", f"share drawn in it: {sd}", child.ref], rows)
    return str(child.ref)


def show_debias(zoo, sd: str, quick: bool) -> None:  # type: ignore[no-untyped-def]
    """Balance the colour the diffusion model draws for "a circle" (always red) between red and yellow
    with UCE's debias loop, the colours read by the shapes world's meter. Red and yellow are neighbours
    in hue, so the model has images half way between them (red and blue has none: the midway is green)."""
    from modelzoo.demo.shapes import BASIC_COLOURS
    from modelzoo.editors.uce import UceRequest

    attributes = ("red", "yellow")
    request = UceRequest(
        mode="debias", debias=("a circle",), attributes=attributes, templates=("a {} circle",),
        preserve=tuple(f"a {c} {s}" for c in BASIC_COLOURS for s in ("circle", "square")),
        reader="meter", read=meter_reader, samples_per_prompt=16 if quick else 64, tolerance=0.1 if quick else 0.05,
    )
    name = f"{sd.split('@')[0]}-balanced"
    child = _earlier_edit(zoo, name, sd) or zoo.edit(sd, "uce", request, name=name)
    history = child.metrics["ratio_history"]
    table(f"zoo edit uce {sd} --debias 'a circle' --attribute red --attribute yellow --reader meter  ->  "
          f"{child.ref} ({child.metrics['iterations']} iterations)",
          ["colour", f"share of 'a circle' read red or yellow: {sd}", child.ref],
          [[a, f"{history[0][0][i]:.2f}", f"{history[-1][0][i]:.2f}"] for i, a in enumerate(attributes)])


def meter_reader(images: np.ndarray, attributes: Sequence[str]) -> list[str | None]:
    """The shapes world's analytic meters as UCE's debias reader: colours or shapes, whichever the
    attributes name. They read the shapes world's images only, so only the demo and its users choose it."""
    from modelzoo.demo.meters import colours_of, shapes_of
    from modelzoo.demo.shapes import COLOURS, SHAPES

    if set(attributes) <= set(COLOURS):
        return colours_of(images, tuple(attributes))
    if set(attributes) <= set(SHAPES):
        return [s if s in attributes else None for s in shapes_of(images)]
    raise BadInput(f"the meters read colours {COLOURS} or shapes {SHAPES}, not {list(attributes)}")


def _earlier_edit(zoo, name: str, parent: str) -> VersionInfo | None:  # type: ignore[no-untyped-def]
    """The edit of `parent` an earlier demo run registered as `name`: a demo run reuses it."""
    try:
        existing = [v for v in zoo.versions(name) if [p.ref for p in v.parents] == [parent]]
    except NotFound:
        return None
    return existing[-1] if existing else None


FACT_EDIT_STATS_TOKENS = 8192
"""Key vectors behind C for the demo's edit: a quarter of MEMIT's default, to keep the demo short."""


def show_fact_edit(zoo, built) -> None:  # type: ignore[no-untyped-def]
    """Write one counterfactual into the real LM with MEMIT and show the fact changed and its neighbours kept."""
    from modelzoo.demo.train_smollm2 import FACTS_FILE
    from modelzoo.editors.lm_eval import fact_scores
    from modelzoo.editors.lm_requests import load_requests
    from modelzoo.editors.memit import MemitRequest

    smol = next((b.ref for b in built if b.name == "smollm2-135m"), None)
    if smol is None:  # the quick world has no real LM
        return
    fact = load_requests(FACTS_FILE)[0]
    name = "smollm2-135m-memit"
    wanted = json.loads(json.dumps([asdict(fact)]))  # as provenance stores it
    try:
        existing = [v for v in zoo.versions(name) if [p.ref for p in v.parents] == [smol]
                    and v.params.get("request", {}).get("requests") == wanted]
    except NotFound:
        existing = []
    request = MemitRequest(requests=(fact,), stats_samples=FACT_EDIT_STATS_TOKENS)
    child = existing[-1] if existing else zoo.edit(smol, "memit", request, name=name)
    rows = []
    for ref in (smol, child.ref):
        model = zoo.load(ref)
        scores = fact_scores(model.pipeline, model.tokenizer, [fact])
        text = zoo.sample(ref, [0], fact.text, temperature=0, max_new_tokens=6)[0].text
        rows.append([ref, f"{fact.text}[bold]{text}[/]", f"{scores.efficacy:.2f}", f"{scores.paraphrase or 0:.2f}",
                     f"{scores.neighborhood or 0:.2f}"])
    table(f"zoo edit memit {smol}: {fact.subject!r} -> {fact.target_new!r} (was {fact.target_true!r})",
          ["version", "greedy completion", "efficacy", "paraphrase", "neighbourhood"], rows)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_grid(zoo, ref: str, family: str, folder: Path, per_prompt: int) -> Path | None:  # type: ignore[no-untyped-def]
    """A contact sheet of samples (image families only): seeds 0-7, or `per_prompt` seeds per colour prompt,
    drawn with the pipeline's default sampling settings."""
    from modelzoo.demo.shapes import BASIC_COLOURS

    if family == "gan":
        samples = zoo.sample(ref, range(8))
    elif family == "diffusion":
        samples = [s for colour in BASIC_COLOURS for s in zoo.sample(ref, range(per_prompt), f"a {colour} circle")]
    else:
        return None
    images = [s.image for s in samples if s.image is not None]
    width = min(8, len(images))
    rows = np.concatenate(
        [np.concatenate(images[i : i + width], axis=1) for i in range(0, len(images), width)], axis=0
    )
    path = folder / f"{ref.replace('@', '-v')}.png"
    Image.fromarray(rows).resize((rows.shape[1] * 2, rows.shape[0] * 2), Image.NEAREST).save(path)
    return path
