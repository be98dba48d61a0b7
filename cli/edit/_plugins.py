"""`zoo edit NAME REF [--request FILE.json] [-o key=value ...]` for every editor entry point that has no
subcommand of its own, so an editor from another package needs no code in `cli/`.

The editor class names its request dataclass as `request_type`; `-o` values are converted to the type of
the field they set (numbers, booleans, strings; lists and tuples by repeating the option, or as JSON).
Only the entry point's name is read when the CLI starts: a plugin is imported when its command runs.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from modelzoo.cli.edit._shared import render_child, request_from
from modelzoo.cli.options import Device, Dtype
from modelzoo.cli.output import emit, step_progress
from modelzoo.registry.errors import BadInput

_SCALARS: dict[type, Any] = {int: int, float: float, str: str}


def register_plugin_editors(app: typer.Typer) -> None:
    taken = {command.name for command in app.registered_commands}
    for ep in sorted(entry_points(group="modelzoo.editors"), key=lambda e: e.name):
        if ep.name not in taken:
            app.command(ep.name, cls=_command_class(ep),
                        help=f"Edit with the `{ep.name}` editor ({ep.value}); its request's fields as "
                             "-o key=value or in --request FILE.json.")(_command_for(ep))


def _command_class(ep: EntryPoint) -> type[TyperCommand]:
    """A command whose help ends with the request's fields, read from the plugin only when help is shown."""

    class PluginCommand(TyperCommand):
        @property  # type: ignore[override]
        def epilog(self) -> str | None:
            request_type = getattr(ep.load(), "request_type", None)
            return fields_help(request_type) if is_dataclass(request_type) and isinstance(request_type, type) else None

        @epilog.setter
        def epilog(self, value: str | None) -> None:
            pass

    return PluginCommand


def fields_help(request_type: type) -> str:
    """Each field `-o` can set: its name, type, default and the docstring written under it."""
    docs = _field_docstrings(request_type)
    hints = typing.get_type_hints(request_type)
    rows = []
    for f in fields(request_type):
        if not f.metadata.get("provenance", True):
            continue
        default = (f.default if f.default is not MISSING
                   else f.default_factory() if f.default_factory is not MISSING else "required")
        type_name = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        rows.append(f"{f.name} ({type_name}; default {default!r})" + (f": {docs[f.name]}" if f.name in docs else ""))
    return "\n\n".join([f"Fields of {request_type.__name__}:", *rows])


def _field_docstrings(cls: type) -> dict[str, str]:
    """The string literal under each annotated field (Python keeps none of them at run time)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    return {
        node.target.id: " ".join(after.value.value.split())
        for node, after in zip(body, body[1:], strict=False)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
    }


def _command_for(ep: EntryPoint) -> Any:
    def command(
        ref: str,
        option: Annotated[list[str] | None, typer.Option(
            "-o", "--option", help="A request field as key=value (repeat for each field or list item).")] = None,
        request: Annotated[Path | None, typer.Option(help="JSON file with any of the request's fields.")] = None,
        name: Annotated[str | None, typer.Option(help="Register the child under this model name.")] = None,
        device: Device = "cpu",
        dtype: Dtype = "stored",
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    ) -> None:
        from modelzoo.cli.main import State

        request_type = getattr(ep.load(), "request_type", None)
        if not (is_dataclass(request_type) and isinstance(request_type, type)):
            raise BadInput(f"editor {ep.name!r} ({ep.value}) names no request dataclass as `request_type`")
        req = request_from(request_type, request, parse_options(request_type, option or []), f"{ep.name} request")
        with step_progress(f"{ep.name} edit", quiet=as_json) as progress:
            info = State.zoo().edit(ref, ep.name, req, name=name, device=device, dtype=dtype,
                                     progress=progress)
        emit(info, as_json, render_child)

    return command


def parse_options(request_type: type, pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as request fields: each value converted to its field's type; a repeated key, or
    a list or tuple field, gathers its values into a list."""
    hints = typing.get_type_hints(request_type)
    known = {f.name for f in fields(request_type) if f.metadata.get("provenance", True)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise BadInput(f"-o {pair!r}: use key=value with a field of {request_type.__name__}: {sorted(known)}")
        hint = hints.get(key, str)
        if _is_sequence(hint):
            values.setdefault(key, []).extend(_sequence_value(hint, text, key))
        elif key in values:
            raise BadInput(f"-o {key} given twice; it takes one value")
        else:
            values[key] = convert(hint, text, key)
    return values


def _is_sequence(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple)


def _sequence_value(hint: Any, text: str, key: str) -> list[Any]:
    item = (typing.get_args(hint) or (str,))[0]
    if text.startswith("["):
        parsed = _json(text, key)
        if not isinstance(parsed, list):
            raise BadInput(f"-o {key}: expected a JSON list, got {text!r}")
        return [convert(item, json.dumps(v) if not isinstance(v, str) else v, key) for v in parsed]
    return [convert(item, text, key)]


def convert(hint: Any, text: str, key: str) -> Any:
    """One option value as the field's type wants it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if text.lower() in ("none", "null") and len(options) < len(typing.get_args(hint)):
            return None
        hint = options[0] if len(options) == 1 else Any
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise BadInput(f"-o {key}={text}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    if hint in _SCALARS:
        try:
            return _SCALARS[hint](text)
        except ValueError:
            raise BadInput(f"-o {key}={text}: expected {hint.__name__}") from None
    if typing.get_origin(hint) is typing.Literal:
        if text not in [str(a) for a in typing.get_args(hint)]:
            raise BadInput(f"-o {key}={text}: expected one of {list(typing.get_args(hint))}")
        return next(a for a in typing.get_args(hint) if str(a) == text)
    return _json(text, key) if text[:1] in "[{\"" or text in ("true", "false", "null") else text


def _json(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"-o {key}: {text!r} is not valid JSON ({e.msg})") from None
