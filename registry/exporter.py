"""`zoo export`: write a version in its native layout, loadable by the original library's
`from_pretrained`, with a model card that records where it came from and how it was edited."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from modelzoo.registry.adapters import adapter_files
from modelzoo.registry.errors import BadInput, Corrupted
from modelzoo.registry.formats import split_tensor_name
from modelzoo.registry.lineage import lineage
from modelzoo.registry.paths import check_relative_path, join_inside, output_folder
from modelzoo.registry.records import VersionInfo
from modelzoo.registry.safetensors_io import write_tensors
from modelzoo.registry.single_file import single_file_tensors
from modelzoo.registry.store import Progress, Registry

CARD = "README.md"


def export_version(
    registry: Registry, ref: str, out: Path, progress: Progress | None = None, format: str = "native"
) -> Path:
    """Write into a temporary sibling folder, then rename: an interrupted export leaves no half folder.

    `format`: "native" (the merged model, loadable by from_pretrained), "lora" (a factored child as an
    adapter of its parent, see `registry/adapters.py`) or "single-file" (a diffusion pipeline as one
    safetensors file in the original LDM layout, see `registry/single_file.py`; `out` is that file)."""
    out = Path(out)
    if format == "single-file":
        return _export_file(out, single_file_tensors(registry, ref))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"export target {out} already exists and is not an empty folder")
    if format == "lora":
        return _export_files(out, adapter_files(registry, ref))
    if format != "native":
        raise BadInput(f"unknown export format {format!r}: native, lora or single-file")
    info = registry.info(ref)
    weight_files = info.config.get("weight_files", {"": "model.safetensors"})
    if not isinstance(weight_files, dict) or not all(isinstance(v, str) for v in weight_files.values()):
        raise Corrupted(f"{info.ref}: its config's weight_files is not an object of file names")
    files = registry.load_files(ref)
    tensors = registry.load_tensors(ref, verify=False)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        component, key = split_tensor_name(name, set(weight_files))
        filename = weight_files.get(component) or weight_files.get("", "model.safetensors")
        by_file.setdefault(f"{component}/{filename}" if component else filename, {})[key] = tensor
    for path in files:
        check_relative_path(path, f"file name in {info.ref}")
    for path in by_file:
        check_relative_path(path, f"weight file name in {info.ref}")

    # Hashes are checked on a second thread while the main one writes; the folder is only renamed into
    # place once every blob has proved intact.
    checker = ThreadPoolExecutor(max_workers=1)
    checks = [checker.submit(registry.check_blob, b.sha256, b.kind) for b in registry.manifest(ref).values()]
    try:
        with _staged_folder(out) as staging:
            _write_native(registry, info, staging, files, by_file, checks, progress)
    finally:
        checker.shutdown(cancel_futures=True)
    return out


def _write_native(
    registry: Registry, info: VersionInfo, staging: Path, files: dict[str, bytes],
    by_file: dict[str, dict[str, torch.Tensor]], checks: list[Future[str | None]], progress: Progress | None,
) -> None:
    for path, data in files.items():
        if path != CARD:
            _write(join_inside(staging, path, f"file name in {info.ref}"), data)
    total = sum(t.nbytes for group in by_file.values() for t in group.values())
    done = 0
    for path, group in sorted(by_file.items()):
        target = join_inside(staging, path, f"weight file name in {info.ref}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as f:
            write_tensors(f, dict(sorted(group.items())), metadata={"format": "pt"})
        done += sum(t.nbytes for t in group.values())
        if progress:
            progress(done, total)
    _write(staging / CARD, model_card(registry, info, files.get(CARD)).encode())
    problems = [p for p in (c.result() for c in checks) if p is not None]
    if problems:
        raise Corrupted(f"{info.ref} has damaged blobs ({problems[0]}); run `zoo verify`")


@contextmanager
def _staged_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling folder, renamed to `out` when the block ends, removed if it fails."""
    output_folder(out.parent, "export folder's parent")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _export_files(out: Path, files: dict[str, bytes | dict[str, torch.Tensor]]) -> Path:
    """Write files (bytes, or tensors as a safetensors file) in place of `out`, all or nothing."""
    with _staged_folder(out) as staging:
        for path, content in files.items():
            target = join_inside(staging, path, "exported file name")
            if isinstance(content, bytes):
                _write(target, content)
            else:
                with open(target, "wb") as f:
                    write_tensors(f, content, metadata={"format": "pt"})
    return out


def _export_file(out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """One safetensors file written under a temporary sibling name and renamed into place."""
    if out.exists() or out.is_symlink():
        raise BadInput(f"export target {out} already exists")
    output_folder(out.parent, "export file's folder")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(staging, "wb") as f:
            write_tensors(f, {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
        os.replace(staging, out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return out


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def model_card(registry: Registry, info: VersionInfo, original: bytes | None) -> str:
    """A Hub-style card: YAML front matter with `base_model`, then the version's edit history."""
    history = lineage(registry, info.ref).ancestors
    root = registry.info(history[-1].ref) if history else info
    base_model = root.source.get("base_model") or (history[0].ref if history else None)
    library = {"diffusers": "diffusers", "transformers": "transformers"}.get(info.config.get("format", ""))
    front = {"base_model": base_model, "library_name": library, "tags": ["modelzoo", info.family]}
    lines = ["---"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in front.items() if v]
    lines += ["modelzoo:", f"  ref: {info.ref}", f"  manifest_hash: {info.manifest_hash}", "---", ""]
    lines += [f"# {info.ref}", "", f"Exported by modelzoo {info.package_version}.", "", "## Edit history", ""]
    lines += ["| version | method | relation | parameters |", "|---|---|---|---|"]
    for node in reversed(history):
        lines.append(f"| {node.ref} | {node.method} | {node.relation} | `{json.dumps(node.params)}` |")
    lines.append(f"| {info.ref} | {info.method} | this version | `{json.dumps(info.params)}` |")
    if original:
        body = original.decode(errors="replace")
        if body.startswith("---"):
            body = body[3:].partition("\n---")[2]
        lines += ["", "## Original model card", "", body.strip()]
    return "\n".join(lines) + "\n"
