"""Version references: `name`, `name@3`, `name@latest`, `name@ALIAS`, or a manifest-hash prefix."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select
from sqlalchemy.orm import Session

from modelzoo.registry.errors import BadInput, NotFound
from modelzoo.registry.schema import Alias, Model, Version

# Patterns are matched with fullmatch: `$` would also match before a final newline.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
HASH_PREFIX = re.compile(r"[0-9a-f]{6,64}")
VERSION_NUMBER = re.compile(r"[0-9]{1,18}")  # ASCII digits only (str.isdigit also takes '١'), below 2**63
MIN_HASH_PREFIX = 6
TAG_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
MAX_TAG_VALUE = 256


def check_model_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        shown = name.encode("unicode_escape").decode()
        raise BadInput(
            f"invalid model name {shown!r}: use letters, digits, '.', '_', '+', '-' "
            "(no path separators or control characters, at most 128 characters)"
        )
    return name


def check_alias_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or name.isdigit() or name == "latest":
        shown = name.encode("unicode_escape").decode()
        raise BadInput(f"invalid alias {shown!r}: not a number, not 'latest', letters/digits/'.-_+' only")
    return name


def check_tag(key: str, value: str) -> None:
    if not TAG_KEY.fullmatch(key) or len(value) > MAX_TAG_VALUE or not value.isprintable():
        shown = key.encode("unicode_escape").decode()[:80]
        raise BadInput(f"invalid tag {shown!r}: a key of letters, digits and '.-_:/', and a printable value of "
                       f"at most {MAX_TAG_VALUE} characters")


@dataclass(frozen=True)
class ParsedRef:
    name: str
    selector: str | None  # None, a number, "latest" or an alias


def parse_ref(ref: str) -> ParsedRef:
    name, sep, selector = ref.partition("@")
    if not name or (sep and not selector) or "@" in selector:
        raise BadInput(f"invalid version reference {ref!r}: use NAME, NAME@NUMBER, NAME@ALIAS or a hash prefix")
    return ParsedRef(name, selector or None)


def resolve(session: Session, ref: str, include_deleted: bool = False) -> Version:
    parsed = parse_ref(ref)
    model = session.scalar(select(Model).where(Model.name == parsed.name))
    if model is None:
        if parsed.selector is None and HASH_PREFIX.fullmatch(ref):
            return _by_hash_prefix(session, ref)
        raise NotFound(f"no model named {parsed.name!r}; `zoo list` shows the registered models")
    selector = parsed.selector or "latest"
    if selector == "latest":
        number = session.scalar(
            select(func.max(Version.number)).where(Version.model_id == model.id, Version.status == "ready")
        )
        if number is None:
            raise NotFound(f"model {model.name!r} has no live versions")
    elif VERSION_NUMBER.fullmatch(selector):
        number = int(selector)
    elif selector.isdigit() or selector.isdecimal():
        raise BadInput(f"invalid version number {selector[:40]!r}: ASCII digits, below 2**63")
    else:
        alias = session.get(Alias, (model.id, selector))
        if alias is None:
            raise NotFound(f"{model.name} has no version {selector!r} (neither a number nor an alias)")
        version = session.get(Version, alias.version_id)
        assert version is not None
        return version
    version = session.scalar(select(Version).where(Version.model_id == model.id, Version.number == number))
    if version is None or (version.status == "deleted" and not include_deleted):
        raise NotFound(f"{model.name}@{number} does not exist; `zoo show {model.name}` lists its versions")
    return version


def _by_hash_prefix(session: Session, prefix: str) -> Version:
    matches = session.scalars(
        select(Version).where(hex_prefix(Version.manifest_hash, prefix)).limit(2)
    ).all()
    if not matches:
        raise NotFound(f"no model or manifest hash matches {prefix!r}")
    if len(matches) > 1 and len({m.manifest_hash for m in matches}) > 1:
        raise BadInput(f"hash prefix {prefix!r} is ambiguous; give more characters")
    return matches[0]


def hex_prefix(column: Any, prefix: str) -> ColumnElement[bool]:
    """`column` starts with a lower-case hex `prefix`, as a range that both SQLite and PostgreSQL answer
    from the column's index (SQLite's LIKE is case-insensitive and cannot use a plain index)."""
    return and_(column >= prefix, column < prefix + "g")  # "g" sorts after every hex digit


def ref_of(version: Version) -> str:
    return f"{version.model.name}@{version.number}"
