"""`zoo`: the command line. It parses, calls the Python API, and prints; nothing else."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

import modelzoo
from modelzoo.cli import analyze, analyze_board, analyze_circuit, compose, demo, evaluate, sample, search, serve
from modelzoo.cli.edit import edit_app
from modelzoo.cli.output import byte_progress, console, emit, errors, human_bytes, route_library_output, table
from modelzoo.registry.errors import BadInput, NotFound, ZooError
from modelzoo.registry.queries import ListFilter, parse_since
from modelzoo.registry.records import Diff, Lineage, VerifyReport, VersionInfo, to_json

app = typer.Typer(
    name="zoo", help="A registry for generative and language models.", no_args_is_help=True,
    pretty_exceptions_enable=False, add_completion=False,
)
alias_app = typer.Typer(help="Movable names for versions (name@prod).", no_args_is_help=True)
app.add_typer(alias_app, name="alias")
app.add_typer(edit_app, name="edit")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


class State:
    home: str | None = None
    db: str | None = None
    _zoo: modelzoo.Zoo | None = None

    @classmethod
    def zoo(cls) -> modelzoo.Zoo:
        if cls._zoo is None:
            cls._zoo = modelzoo.open(cls.home, cls.db)
        return cls._zoo


class Interrupted(Exception):
    """Ctrl-C inside a command, carried past click, which turns KeyboardInterrupt into a silent exit."""


@contextmanager
def _interrupts_reported() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted from None


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[str | None, typer.Option("--home", envvar="ZOO_HOME", help="Registry home folder.")] = None,
    db: Annotated[str | None, typer.Option("--db", envvar="ZOO_DATABASE_URL", help="Database URL.")] = None,
    verbose: Annotated[bool, typer.Option(
        "-v", "--verbose", help="Also show third-party warnings and progress bars, and modelzoo's info log.")] = False,
) -> None:
    State.home, State.db, State._zoo = home, db, None
    route_library_output(verbose)
    ctx.with_resource(_interrupts_reported())  # sees the command's exception as the context closes


def parse_pairs(pairs: list[str] | None, what: str = "tag") -> dict[str, str]:
    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"invalid {what} {pair!r}: use key=value")
        result[key] = value
    return result


@app.command()
def init() -> None:
    """Create (or upgrade) the registry."""
    zoo = State.zoo()
    console.print(f"registry ready at [bold]{zoo.settings.home}[/] ({zoo.settings.database_url})")


@app.command("import")
def import_(
    path: Path,
    name: Annotated[str, typer.Option("--name", help="Model name; an existing name gets its next version.")],
    family: Annotated[str | None, typer.Option(help="diffusion | lm | gan (inferred when possible).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="JSON config for a single weights file; a diffusers folder for a single-file SD checkpoint.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value label (repeatable).")] = None,
    base: Annotated[str | None, typer.Option(help="Parent version (REF), or 'auto' for the best match.")] = None,
    relation: Annotated[str | None, typer.Option(
        help="Relation to --base (default: adapter for a LoRA adapter, else finetune).")] = None,
    description: str = "",
    allow_nonfinite: Annotated[bool, typer.Option(help="Keep tensors holding NaN/Inf.")] = False,
    follow_symlinks: Annotated[bool, typer.Option(
        "--follow-symlinks", help="Follow links that leave the folder (files you trust, e.g. a HF cache).")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Import a diffusers/transformers folder or a safetensors file as a new version, or a LoRA adapter (PEFT
    folder, diffusers or kohya file) as a child of --base."""
    tags = parse_pairs(tag)
    with byte_progress(f"importing {path.name}", quiet=as_json) as progress:
        info = State.zoo().import_(
            path, name, family=family, config=config, tags=tags, base=base, relation=relation,
            description=description, allow_nonfinite=allow_nonfinite, follow_symlinks=follow_symlinks,
            progress=progress,
        )
    emit(info, as_json, _render_import)


def _render_import(i: VersionInfo) -> None:
    console.print(
        f"registered [bold]{i.ref}[/] ({i.family}, {i.tensor_count} tensors, {human_bytes(i.logical_bytes)}, "
        f"{human_bytes(i.added_bytes)} new on disk)"
    )
    for r in i.source.get("related", []):
        console.print(f"  shares {r['fraction']:.0%} of its tensor bytes with {r['ref']}")
    for p in i.parents:
        console.print(f"  parent: {p.ref} ({p.relation})")
    console.print(f"Next: `zoo show {i.ref}`")


@app.command("list")
def list_(
    family: Annotated[str | None, typer.Option(help="Only this family.")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value (repeatable; all must match).")] = None,
    method: Annotated[str | None, typer.Option(help="Versions made by this method (import, uce, ...).")] = None,
    since: Annotated[str | None, typer.Option(help="Versions created on or after this ISO date.")] = None,
    descendant_of: Annotated[str | None, typer.Option(help="Versions derived from REF at any depth.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List models with their latest version; filters compose in one query."""
    flt = ListFilter(family, parse_pairs(tag), method, parse_since(since), descendant_of)
    models = State.zoo().list(flt)
    emit(models, as_json, lambda ms: table(
        None, ["name", "family", "latest", "versions", "matching", "tags", "description"],
        [[m.name, m.family, m.latest, m.versions, _numbers(m.matching_versions),
          ", ".join(f"{k}={v}" for k, v in m.tags.items()), m.description] for m in ms],
    ) if ms else console.print("no models match" if flt != ListFilter() else
                               "no models yet: `zoo import PATH --name NAME` or `zoo demo`"))


def _numbers(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:8]))
    return shown + (f", ... ({len(numbers)})" if len(numbers) > 8 else "")


@app.command()
def find(sha256: Annotated[str, typer.Argument(help="A sha256 or a prefix of at least 6 hex digits.")],
         as_json: JsonFlag = False) -> None:
    """Every version holding a tensor or file with this hash (or whose manifest has it)."""
    hits = State.zoo().find(sha256)
    if not hits:
        raise NotFound(f"no tensor, file or manifest in the registry has a hash starting {sha256}")
    emit(hits, as_json, lambda hs: table(
        None, ["version", "kind", "name", "sha256"], [[h.ref, h.kind, h.name, h.sha256] for h in hs]
    ))


@app.command()
def stats(as_json: JsonFlag = False) -> None:
    """What the store really holds against the sum of every version's size."""
    s = State.zoo().stats()
    record = {**to_json(s), "dedup_ratio": round(s.dedup_ratio, 3)}
    emit(record, as_json, lambda r: table(None, ["", ""], [
        ["models", r["models"]], ["live versions", r["versions"]], ["blobs", r["blobs"]],
        ["logical size (all versions)", human_bytes(r["logical_bytes"])],
        ["stored (deduplicated)", human_bytes(r["stored_bytes"])],
        ["  of which editor caches", human_bytes(r["derived_bytes"])], ["on disk", human_bytes(r["disk_bytes"])],
        ["deduplication", f"{r['dedup_ratio']}x"],
    ]))


def _render_version(i: VersionInfo) -> None:
    rows = [
        ["ref", i.ref], ["family", i.family], ["status", i.status], ["manifest", i.manifest_hash],
        ["created", i.created_at.isoformat(timespec="seconds")], ["method", i.method],
        ["params", i.params or ""], ["metrics", i.metrics or ""],
        ["parents", ", ".join(f"{p.ref} ({p.relation})" for p in i.parents)],
        ["tensors", i.tensor_count], ["size", human_bytes(i.logical_bytes)],
        ["added to store", human_bytes(i.added_bytes)],
        ["tags", ", ".join(f"{k}={v}" for k, v in i.tags.items())], ["aliases", ", ".join(i.aliases)],
        ["source", i.source.get("path", "")], ["analyses", i.analyses],
    ]
    table(None, ["field", "value"], rows)


@app.command()
def show(ref: str, as_json: JsonFlag = False) -> None:
    """Show one version: provenance, size, parents, tags."""
    emit(State.zoo().get(ref), as_json, _render_version)


def _render_lineage(lin: Lineage) -> None:
    rows = [[f"-{n.depth}", n.ref, n.relation, n.method, n.params] for n in reversed(lin.ancestors)]
    rows.append(["0", lin.ref, "", "", ""])
    rows += [[f"+{n.depth}", n.ref, n.relation, n.method, n.params] for n in lin.descendants]
    table(f"lineage of {lin.ref}", ["depth", "version", "relation", "method", "params"], rows)


@app.command()
def lineage(ref: str, as_json: JsonFlag = False) -> None:
    """Ancestors and descendants of a version."""
    emit(State.zoo().lineage(ref), as_json, _render_lineage)


def _render_diff(d: Diff) -> None:
    table(
        f"{d.a} -> {d.b}: {len(d.changed)} changed, {d.unchanged} unchanged",
        ["tensor", "status", "relative change"],
        [[c.tensor, c.status, f"{c.relative_change:.3g}" if c.relative_change is not None else ""]
         for c in d.changed],
    )


@app.command()
def diff(a: str, b: str, as_json: JsonFlag = False) -> None:
    """Which tensors differ between two versions, and by how much."""
    emit(State.zoo().diff(a, b), as_json, _render_diff)


@app.command()
def export(
    ref: str,
    out: Path,
    format: Annotated[str, typer.Option(
        "--format", help="native: the merged model (from_pretrained); lora: a factored child as an adapter "
        "of its parent (PEFT folder for an LM, diffusers LoRA file for diffusion); single-file: a diffusion "
        "pipeline as one safetensors file in the original SD layout (OUT is the file).")] = "native",
) -> None:
    """Write a version as a folder that diffusers/transformers load with from_pretrained, or as a LoRA adapter."""
    with byte_progress(f"exporting {ref}") as progress:
        path = State.zoo().export(ref, out, progress, format)
    console.print(f"exported {ref} to {path}")


def _render_verify(report: VerifyReport) -> None:
    if report.ok:
        console.print(f"ok: {report.blobs_checked} blobs ({human_bytes(report.bytes_checked)}) match their hashes")
        return
    for d in report.damaged:
        users = d.versions + d.analyses + [
            f"editor cache {kind} (recomputed on next use; `zoo gc --drop-derived` drops it)" for kind in d.derived]
        errors.print(f"damaged blob {d.sha256} ({d.problem}); used by {', '.join(users) or 'nothing'}")


@app.command()
def verify(ref: Annotated[str | None, typer.Argument()] = None, as_json: JsonFlag = False) -> None:
    """Recompute the hashes of stored blobs; exit 1 if any is damaged."""
    report = State.zoo().verify(ref)
    emit(report, as_json, _render_verify)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def gc(
    purge: Annotated[bool, typer.Option("--purge", help="Also free the blobs of deleted versions.")] = False,
    grace: Annotated[float, typer.Option(help="Keep unreferenced files younger than this (seconds).")] = 3600.0,
    drop_derived: Annotated[bool, typer.Option(
        "--drop-derived", help="Also drop editor caches (MEMIT statistics); recomputed when next needed.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Remove blobs that no version (or kept editor cache) references."""
    report = State.zoo().gc(purge_deleted=purge, grace_s=grace, drop_derived=drop_derived)
    emit(report, as_json, lambda r: console.print(
        f"removed {r.blobs_removed} blobs ({human_bytes(r.bytes_freed)}), {r.stray_files_removed} stray files, "
        f"purged {r.versions_purged} deleted versions and {r.analyses_dropped} of their analyses, "
        f"dropped {r.derived_dropped} derived tensors"
    ))


@app.command()
def tag(ref: str, pairs: Annotated[list[str], typer.Argument(help="key=value")]) -> None:
    """Label a model (NAME) or one version (NAME@N)."""
    for key, value in parse_pairs(pairs).items():
        State.zoo().tag(ref, key, value)
    console.print(f"tagged {ref}")


@app.command()
def delete(ref: str) -> None:
    """Soft-delete a version (hidden, recoverable until `zoo gc --purge`)."""
    info = State.zoo().delete(ref)
    console.print(f"deleted {info.ref}; `zoo restore {info.ref}` undoes this until `zoo gc --purge`")


@app.command()
def restore(ref: str) -> None:
    """Undo a soft delete."""
    console.print(f"restored {State.zoo().restore(ref).ref}")


@alias_app.command("set")
def alias_set(ref: str, alias: str) -> None:
    """Point NAME@ALIAS at the version REF (every move is kept in the history)."""
    info = State.zoo().set_alias(ref, alias)
    console.print(f"{info.model}@{alias} -> {info.ref}")


@alias_app.command("history")
def alias_history(target: Annotated[str, typer.Argument(help="NAME@ALIAS")], as_json: JsonFlag = False) -> None:
    """When each alias pointed where."""
    model, sep, alias = target.partition("@")
    if not sep or not alias:
        raise BadInput(f"expected NAME@ALIAS, got {target!r}")
    events = State.zoo().alias_history(model, alias)
    emit(events, as_json, lambda es: table(
        f"{target} history", ["at", "points to"], [[e.at.isoformat(timespec="seconds"), e.ref] for e in es]
    ))


sample.register(app)
demo.register(app)
compose.register(app)
evaluate.register(app)
search.register(app)
serve.register(app)
analyze.register(app)
analyze_board.register(analyze.analyze_app)
analyze_circuit.register(analyze.analyze_app)


def run(argv: list[str] | None = None) -> Any:
    """Entry point: every ZooError becomes one line on stderr and its exit code (2 bad input, 1 damage)."""
    try:
        return app(args=argv, standalone_mode=True)
    except ZooError as error:
        print(f"error: {error}", file=sys.stderr)  # one unwrapped line, whatever the terminal width
        sys.exit(error.exit_code)
    except Interrupted:
        print("interrupted: nothing was registered", file=sys.stderr)
        sys.exit(130)
