"""`zoo sample REF`: one sample per seed S, S+1, ..., S+N-1, written as `<seed>.png` or JSON lines.

Bad input writes nothing. What the flags decide (--n, seeds, --out or --grid that cannot be written, a
prompt the family refuses or lacks, an option its `sample` has no parameter for, a family with no
installed adapter) is refused before a model is loaded. Whether a family draws images or text shows in
its samples, so output is created only after the first sample has been drawn and checked: --grid for
text, or an option a family refuses itself (a GAN's `**options`), still leaves no file behind.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TextIO

import numpy as np
import typer
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import console, emit, errors
from modelzoo.registry.errors import BadInput
from modelzoo.registry.families.base import Family, Sample, contact_sheet, get_family
from modelzoo.registry.paths import check_creatable_file, check_creatable_folder
from modelzoo.registry.records import VersionInfo

MAX_SEED = 2**32  # seeds are numpy RandomState seeds (latents_for_seeds), as in the official generators
TEXT_FILE = "samples.jsonl"


@dataclass(frozen=True)
class SampleReport:
    """What `zoo sample --json` prints: the version, the seeds and every file written."""

    ref: str
    family: str
    seeds: list[int]
    out: str | None
    files: list[str]
    grid: str | None = None


def check_request(seed: int, n: int, steps: int | None, out: Path | None, grid: Path | None) -> list[int]:
    """The seeds to draw, after refusing every flag that cannot work; nothing is read or written."""
    if n < 1:
        raise BadInput(f"--n must be at least 1, got {n}")
    if seed < 0 or seed + n > MAX_SEED:
        raise BadInput(f"seeds must lie in [0, 2**32): --seed {seed} --n {n} does not")
    if steps is not None and steps < 1:
        raise BadInput(f"--steps must be at least 1, got {steps}")
    if out is not None:
        check_creatable_folder(out, "--out")
    if grid is not None:
        if grid.suffix.lower() != ".png":
            raise BadInput(f"--grid writes a PNG file; give it a .png name, not {grid.name!r}")
        check_creatable_file(grid, "--grid")
    return list(range(seed, seed + n))


def check_family_accepts(family: Family, info: VersionInfo, prompt: str | None, options: dict[str, Any]) -> None:
    """The prompt rules, and that `family.sample` has a parameter for every option, checked by its signature."""
    if prompt is not None and not family.takes_prompts:
        raise BadInput(f"{info.ref} is a {info.family} model: it samples from seeds alone; drop --prompt")
    if prompt is None and family.needs_prompt:
        raise BadInput(f"{info.ref} is a {info.family} model: it needs --prompt TEXT to sample")
    try:
        inspect.signature(family.sample).bind(None, [], prompt, **options)
    except TypeError:
        flags = " ".join(f"--{name}" for name in options)
        raise BadInput(f"{info.ref} is a {info.family} model and takes no {flags}") from None


@dataclass
class SampleWriter:
    """Where samples go, chosen from the first sample: `<seed>.png` files (and a grid), or JSON lines.

    Images without --out go to ./samples/NAME-vN; text without --out goes to stdout.
    """

    info: VersionInfo
    images: bool
    out: Path | None
    grid: Path | None
    files: list[Path] = field(default_factory=list)
    _kept: list[np.ndarray] = field(default_factory=list)
    _text: TextIO | None = None

    @classmethod
    def open(cls, first: Sequence[Sample], info: VersionInfo, out: Path | None, grid: Path | None) -> SampleWriter:
        images = first[0].image is not None
        if not images and grid is not None:
            raise BadInput(f"{info.ref} is a {info.family} model and draws text; --grid needs an image model")
        if images and out is None:
            out = Path("samples") / f"{info.model}-v{info.number}"
            check_creatable_folder(out, "the default output folder")
        writer = cls(info, images, out, grid)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        if not images:
            writer._text = sys.stdout if out is None else open(out / TEXT_FILE, "w")  # noqa: SIM115
            if out is not None:
                writer.files.append(out / TEXT_FILE)
        return writer

    def add(self, samples: Sequence[Sample]) -> None:
        for s in samples:
            if self.images:
                assert s.image is not None and self.out is not None
                path = self.out / f"{s.seed}.png"
                Image.fromarray(s.image).save(path)
                self.files.append(path)
                if self.grid is not None:
                    self._kept.append(s.image)
            else:
                assert self._text is not None
                self._text.write(json.dumps({"seed": s.seed, "prompt": s.prompt, "text": s.text}) + "\n")
                self._text.flush()

    def close(self, seeds: list[int]) -> SampleReport:
        if self._text is not None and self._text is not sys.stdout:
            self._text.close()
        if self.grid is not None:
            self.grid.parent.mkdir(parents=True, exist_ok=True)
            contact_sheet(self._kept).save(self.grid)
        return SampleReport(
            ref=self.info.ref,
            family=self.info.family,
            seeds=seeds,
            out=None if self.out is None else str(self.out),
            files=[str(p) for p in self.files],
            grid=None if self.grid is None else str(self.grid),
        )


@contextmanager
def count_progress(label: str, total: int, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar counting samples on stderr; silent for --json output and when stderr is not a terminal."""
    if quiet or not errors.is_terminal:
        yield lambda done: None
        return
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=errors, transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.advance(task, done)


def _render(report: SampleReport) -> None:
    where = report.out if report.out is not None else "stdout"
    seeds = f"seed {report.seeds[0]}" if len(report.seeds) == 1 else f"seeds {report.seeds[0]}-{report.seeds[-1]}"
    console.print(f"wrote {len(report.seeds)} samples of [bold]{report.ref}[/] ({seeds}) to {where}")
    if report.grid:
        console.print(f"grid: {report.grid}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def sample(
    ref: str,
    prompt: Annotated[str | None, typer.Option(help="Prompt (diffusion: required; lm: the text to continue).")] = None,
    seed: Annotated[int, typer.Option(help="First seed; samples use seeds S, S+1, ..., S+N-1.")] = 0,
    n: Annotated[int, typer.Option("--n", help="Number of samples, one per seed.")] = 4,
    out: Annotated[Path | None, typer.Option(help="Folder for <seed>.png or samples.jsonl.")] = None,
    grid: Annotated[Path | None, typer.Option(help="Also write a contact sheet of the images (PNG).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (diffusion models).")] = None,
    device: Device = "cpu",
    dtype: Dtype = "stored",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Draw N samples of a version, one per seed: images as <seed>.png, text as JSON lines."""
    # Imported here, not at the top: main imports this module to register the command.
    from modelzoo.cli.main import State

    seeds = check_request(seed, n, steps, out, grid)
    options: dict[str, Any] = {} if steps is None else {"steps": steps}
    zoo = State.zoo()
    info = zoo.get(ref)
    family = get_family(info.family)
    check_family_accepts(family, info, prompt, options)
    model = zoo.load(info.ref, device, dtype)
    writer: SampleWriter | None = None
    with count_progress(f"sampling {info.ref}", len(seeds), quiet=as_json) as advance:
        # One seed per call: progress per sample, and a sample never depends on its batch.
        for s in seeds:
            samples = family.sample(model, [s], prompt, **options)
            if writer is None:
                writer = SampleWriter.open(samples, info, out, grid)
            writer.add(samples)
            advance(len(samples))
    assert writer is not None
    report = writer.close(seeds)
    if writer.images or writer.out is not None:
        emit(report, as_json, _render)
