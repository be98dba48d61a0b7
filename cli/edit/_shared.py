"""What several `zoo edit` subcommands share: reading a JSON request file, loading an image reader, and
showing the child."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelzoo.cli.output import console
from modelzoo.editors.requests import parse_request
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import VersionInfo

if TYPE_CHECKING:
    from modelzoo import Zoo

READER_HELP = ("clip (the registry's CLIP model, default) | clip:SPEC (an encoder as `zoo index --encoder` takes: "
               "zoo:REF, open_clip:ARCH:TAG or a CLIP folder) | meter (the shapes world's meters).")


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; a one-line BadInput naming `what` when it is missing, unreadable or not one."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"no {what} file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read the {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: a {what} is a JSON object, not {type(data).__name__}")
    return data


def request_from(cls: type, file: Path | None, flags: dict[str, Any], what: str) -> Any:
    """The request from a JSON file, overridden by the flags that were given (not None/empty), built by the
    request protocol (`modelzoo.editors.requests`)."""
    values = read_json_object(file, what) if file is not None else {}
    values |= {k: v for k, v in flags.items() if v is not None and v != []}
    return parse_request(cls, values, f"{what} {file}" if file is not None else what)


def render_child(info: VersionInfo) -> None:
    shown = {k: v for k, v in (info.metrics or {}).items() if not isinstance(v, list | dict)}
    console.print(f"registered [bold]{info.ref}[/] ({info.method} edit); metrics: {shown}")
    console.print(f"Next: `zoo diff {info.parents[0].ref if info.parents else info.ref} {info.ref}` or "
                  f"`zoo sample {info.ref} --prompt ...`")


def with_reader(req: Any, zoo: Zoo, templates: Sequence[str]) -> Any:
    """The request (one with `reader` and `read` fields) with the reader its name asks for loaded, CLIP
    prompting each attribute in `templates`; "clip" and "clip:zoo:REF" the editor loads itself."""
    from modelzoo.editors.readers import ZOO_CLIP_PREFIX, clip_reader

    if req.reader == "meter":
        from modelzoo.cli.demo import meter_reader

        return replace(req, read=meter_reader)
    if req.reader.startswith("clip:") and not req.reader.startswith(ZOO_CLIP_PREFIX):
        from modelzoo.search.embedders import load_embedder

        encoder = load_embedder(req.reader.removeprefix("clip:"), zoo.registry)
        return replace(req, reader=f"clip:{encoder.id}", read=clip_reader(encoder, templates))
    return req
