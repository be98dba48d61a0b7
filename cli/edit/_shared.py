"""What several `zoo edit` subcommands share: reading a JSON request file, and showing the child."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelzoo.cli.output import console
from modelzoo.editors.requests import parse_request
from modelzoo.registry.errors import BadInput
from modelzoo.registry.records import VersionInfo


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
