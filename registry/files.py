"""Reading files that someone else controls: a user's model folder, or a blob folder that may have been
tampered with.

Only regular files are ever opened, with O_NONBLOCK so that a FIFO put in a file's place cannot make a
reader wait forever, and the type is checked on the open descriptor (not on the name, which can change
between a check and the open). Size limits count the bytes actually read: procfs reports size 0 for
files that hold kilobytes.

An import reads only what is inside the folder it was given. A symlink that resolves outside it is
refused, or followed when the user vouches for it (`follow_symlinks`, e.g. a Hugging Face cache snapshot,
whose files link into the cache's `blobs/` folder); special files (FIFOs, devices, sockets) and files of
the kernel's virtual file systems are refused whatever the flag.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from modelzoo.registry.errors import BadInput
from modelzoo.registry.paths import is_inside, is_virtual, shown

READ_CHUNK = 2**20


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


class NotRegular(OSError):
    """The name is (now) something other than a regular file."""


@contextmanager
def open_regular(path: Path, follow_symlinks: bool = True) -> Iterator[int]:
    """A read-only descriptor of a regular file, opened without blocking; NotRegular otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(f"{path} is a {file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def read_limited(path: Path, limit: int, what: str = "file", follow_symlinks: bool = True) -> bytes:
    """A regular file's bytes; BadInput when it is not one, cannot be read, or holds more than `limit`."""
    chunks: list[bytes] = []
    total = 0
    try:
        with open_regular(path, follow_symlinks) as fd:
            while chunk := os.read(fd, min(READ_CHUNK, limit + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise BadInput(f"{path} holds more than {limit} bytes: too large for a {what}")
    except NotRegular as e:
        raise BadInput(str(e)) from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    return b"".join(chunks)



def resolve_link(path: Path, root: Path, follow_symlinks: bool) -> Path:
    """Where a name in `root` leads: itself, or a link's target, refused when that leaves `root` (unless
    links may be followed) or lies on a virtual file system (always)."""
    if not path.is_symlink():
        return path
    target = path.resolve()
    if is_virtual(target):
        raise BadInput(f"{shown(str(path))} links to {target}, on a virtual file system: refused")
    if not is_inside(target, root.resolve()) and not follow_symlinks:
        raise BadInput(f"{shown(str(path))} links to {target}, outside {root}: refused "
                       "(--follow-symlinks imports linked files you trust)")
    return target


class SourceFolder:
    """The regular files of a user's model folder (hidden names skipped), found by one walk that refuses
    whatever would make a reader leave the folder."""

    def __init__(self, root: Path, follow_symlinks: bool = False):
        self.root = root.resolve()
        self.follow_symlinks = follow_symlinks
        if is_virtual(self.root):
            raise BadInput(f"{root} is on a virtual file system; import from a real folder")
        self.files: dict[str, Path] = {}  # POSIX path inside the folder -> what to open (links resolved)
        self.folders: set[str] = {""}
        self._walk(self.root, "", {self.root})

    def _walk(self, folder: Path, prefix: str, visited: set[Path]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise BadInput(f"cannot list {folder}: {e.strerror or e}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relative = f"{prefix}{entry.name}"
            path = Path(entry.path)
            target = resolve_link(path, self.root, self.follow_symlinks)
            try:
                mode = os.stat(target).st_mode
            except OSError as e:
                raise BadInput(f"{path}: {e.strerror or e}") from None
            if stat.S_ISDIR(mode):
                if target in visited:  # a link back up the tree
                    continue
                self.folders.add(relative)
                self._walk(target, relative + "/", visited | {target})
            elif stat.S_ISREG(mode):
                self.files[relative] = target
            else:
                raise BadInput(f"{shown(str(path))} is a {file_kind(mode)}, not a regular file: refused")

    def has_file(self, relative: str) -> bool:
        return relative in self.files

    def has_folder(self, relative: str) -> bool:
        return relative in self.folders

    def in_folder(self, folder: str) -> dict[str, Path]:
        """The files directly inside `folder` ("" for the root): name -> what to open."""
        prefix = f"{folder}/" if folder else ""
        return {rel[len(prefix):]: path for rel, path in sorted(self.files.items())
                if rel.startswith(prefix) and "/" not in rel[len(prefix):]}

    def read(self, relative: str, limit: int, what: str = "file") -> bytes:
        """A file's bytes; links were resolved by the walk, so the name opened is never a link now."""
        found = self.files.get(relative)
        if found is None:
            raise BadInput(f"{self.root / relative} is missing")
        return read_limited(found, limit, what, follow_symlinks=False)
