"""The one request protocol every editor follows, built-in or from another package.

An editor names its request dataclass as `request_type`. A request comes from JSON (a request file, `-o`
options, a version's provenance) through `parse_request`, which converts each value to its field's
type, builds nested dataclasses and refuses unknown keys and runtime handles; a request type with its own
file syntax (warp's "layer") defines a `from_json` classmethod and is built by it instead. `validated`
runs the request's optional `validate()`, which returns the request in its normal form (aliases
resolved, implied values filled in) or raises BadInput, so that `apply_edit` refuses bad input before any
model is loaded and records the normal form as provenance.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from modelzoo.registry.errors import BadInput


def parse_request(cls: type, data: Any, what: str = "request") -> Any:
    """A `cls` request from JSON-shaped data (see the module docstring)."""
    custom = getattr(cls, "from_json", None)
    if custom is not None:
        return custom(data)
    if not isinstance(data, Mapping):
        raise BadInput(f"{what} is a JSON object, not {type(data).__name__}")
    settings = {f.name: f for f in fields(cls) if f.metadata.get("provenance", True)}
    unknown = sorted(set(data) - set(settings))
    if unknown:
        raise BadInput(f"{what}: unknown keys {unknown}; known: {sorted(settings)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _value(hints[k], v, f"{what}: {k}") for k, v in data.items()})


def validated(request: Any) -> Any:
    """The request in its normal form, through its own `validate()` where it has one."""
    check = getattr(request, "validate", None)
    return check() if callable(check) else request


def request_json(request: Any) -> Any:
    """A request as JSON-shaped data that `parse_request` turns back into an equal request; runtime
    handles (fields with `metadata={"provenance": False}`) are left out."""
    if is_dataclass(request) and not isinstance(request, type):
        return {f.name: request_json(getattr(request, f.name)) for f in fields(request)
                if f.metadata.get("provenance", True)}
    if isinstance(request, tuple | list):
        return [request_json(v) for v in request]
    if isinstance(request, Mapping):
        return {k: request_json(v) for k, v in request.items()}
    return request


def _value(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _value(option, value, where)
            except BadInput as e:
                errors.append(str(e))
        raise BadInput(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {options}")
    if origin is typing.Literal:
        if value not in args:
            raise BadInput(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise BadInput(f"{where}: expected a list, got {value!r}")
        items = args[:1] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else args
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise BadInput(f"{where}: expected {len(args)} items, got {len(value)}")
        converted = [_value(items[min(i, len(items) - 1)] if items else Any, v, f"{where}[{i}]")
                     for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise BadInput(f"{where}: expected a JSON object, got {value!r}")
        return dict(value)
    if isinstance(hint, type) and is_dataclass(hint):
        return value if isinstance(value, hint) else parse_request(hint, value, where)
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True  # a type this protocol does not know (a path, an enum): the request's validate() checks it
    if not ok:
        raise BadInput(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value
