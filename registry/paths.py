"""Names that become paths, checked in one place.

Component names, file names inside a version, family names and blob keys come from files and databases
that someone else may have written. Each is checked here before it is joined to a folder, and every
join is resolved and checked to stay inside that folder, so no name can reach `..`, an absolute path or
a link out of the folder that it belongs to.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelzoo.registry.errors import BadInput

# The kernel's virtual file systems: reading there returns the reader's environment or blocks, and
# writing there changes the machine, so no model file is read from or written to them.
VIRTUAL_ROOTS = (Path("/proc"), Path("/sys"), Path("/dev"))
MAX_RELATIVE_PATH = 512
_PART = re.compile(r"[^\x00-\x1f\x7f/\\]{1,255}")
FAMILY_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def shown(text: str) -> str:
    """A name as it can be printed on one line (control characters escaped)."""
    return text.encode("unicode_escape").decode()


def check_relative_path(name: object, what: str) -> str:
    """A relative POSIX path of plain parts: no `..`, `.`, empty or absolute parts, no backslashes or
    control characters. Returns it unchanged."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_RELATIVE_PATH:
        raise BadInput(f"invalid {what} {name!r}: expected a relative path of 1-{MAX_RELATIVE_PATH} characters")
    parts = name.split("/")
    if any(part in ("", ".", "..") or not _PART.fullmatch(part) for part in parts):
        raise BadInput(f"invalid {what} {shown(name)!r}: only plain relative paths (no '..', '/' at either end, "
                       "backslashes or control characters)")
    return name


def check_component(name: object, what: str = "component name") -> str:
    """A single path part (a diffusers component folder, a family name)."""
    checked = check_relative_path(name, what)
    if "/" in checked:
        raise BadInput(f"invalid {what} {shown(checked)!r}: a single folder name, without '/'")
    return checked


def check_family_name(name: str) -> str:
    """A family name as entry points spell them. A family need not be installed here to be stored (a
    plugin another user has), but its name is a plain word."""
    if not FAMILY_NAME.fullmatch(name):
        raise BadInput(f"invalid family name {shown(name)[:60]!r}: lower-case letters, digits, '-' or '_'")
    return name


def is_inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def is_virtual(path: Path) -> bool:
    return any(is_inside(path, v) for v in VIRTUAL_ROOTS)


def join_inside(root: Path, relative: str, what: str = "path") -> Path:
    """`root / relative`, refused unless it is a checked relative path that resolves inside `root`."""
    check_relative_path(relative, what)
    base = root.resolve()
    target = (base / relative).resolve()
    if not is_inside(target, base) or target == base:
        raise BadInput(f"{what} {shown(relative)!r} leads outside {root}")
    return base / relative


def check_creatable_folder(path: Path, what: str) -> Path:
    """Refuse, before any work and without creating anything, a folder that could not be written: one on
    a virtual file system, one whose nearest existing ancestor is not a folder or is not writable."""
    absolute = Path(os.path.abspath(path))
    if is_virtual(absolute.resolve()):
        raise BadInput(f"{what} {path} is on a virtual file system ({absolute.resolve()}); choose a real folder")
    existing = next(p for p in (absolute, *absolute.parents) if p.exists())
    if not existing.is_dir():
        raise BadInput(f"{what} {path}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{what} {path}: {existing} is not writable")
    return absolute


def check_creatable_file(path: Path, what: str) -> Path:
    """A file that could be written: not a folder, in a folder that `check_creatable_folder` accepts."""
    if path.is_dir():
        raise BadInput(f"{what} {path} is a folder; give a file name")
    check_creatable_folder(path.parent, what)
    return path


def output_folder(path: Path, what: str) -> Path:
    """A folder checked as `check_creatable_folder` does, then created; still-failing creation (a race,
    a full disk) is one BadInput line too."""
    absolute = check_creatable_folder(path, what)
    try:
        absolute.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {what} {path}: {e.strerror or e}") from None
    return absolute
