"""Content-addressed storage: one blob per tensor (a one-tensor safetensors file) or per file.

A tensor's address is sha256 over its dtype, shape and bytes, so equal tensors are stored once however
many versions use them. Blobs are written to a temporary name, fsynced and renamed, so a crash leaves
either nothing or a whole blob; never a torn one. The backend is a small protocol so an object store can
replace the local directory later.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from modelzoo.registry.errors import Corrupted, NotFound
from modelzoo.registry.files import open_regular
from modelzoo.registry.paths import check_relative_path, is_inside, shown
from modelzoo.registry.safetensors_io import (
    MappedFile,
    TensorInfo,
    dtype_name,
    read_header,
    tensor_bytes,
    write_tensors,
)

TEMP_PREFIX = ".tmp-"
BLOB_TENSOR_NAME = "tensor"


def tensor_digest(dtype: str, shape: tuple[int, ...], data: memoryview) -> str:
    h = hashlib.sha256(f"modelzoo-tensor:{dtype}:{','.join(map(str, shape))}\n".encode())
    h.update(data)
    return h.hexdigest()


def file_digest(data: bytes | memoryview) -> str:
    """Plain sha256 of a file's bytes, so `sha256sum FILE` finds it with `zoo find`."""
    return hashlib.sha256(data).hexdigest()


class BlobBackend(Protocol):
    """Where blob bytes live. Keys are relative paths like `ab/cd/abcd...`."""

    def exists(self, key: str) -> bool: ...
    def write_atomic(self, key: str, write: WriteFn) -> None: ...
    def open_mapped(self, key: str) -> MappedFile: ...
    def read_bytes(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def keys(self, older_than_s: float = 0.0) -> Iterator[str]: ...
    def sync(self) -> None: ...


class WriteFn(Protocol):
    def __call__(self, f: object, /) -> object: ...


class LocalDirectoryBackend:
    """Blobs as files under one folder.

    A write goes to a temporary name; a small pool then fsyncs and renames it while the caller hashes and
    writes the next blob, so the durability cost overlaps the work instead of following each blob.
    `sync()` waits for every pending publish and fsyncs the touched folders: after it returns, every
    blob written so far is durable under its final name.
    """

    PUBLISHERS = 4

    def __init__(self, root: Path):
        self.root = root
        self._dirty_dirs: set[Path] = set()
        self._pending: list[Future[None]] = []
        self._publisher = ThreadPoolExecutor(max_workers=self.PUBLISHERS, thread_name_prefix="zoo-fsync")

    def _path(self, key: str) -> Path:
        """The file of a key; its folders must resolve inside the root (the file itself is never followed)."""
        check_relative_path(key, "blob key")
        path = self.root / key
        if not is_inside(path.parent.resolve(), self.root.resolve()):
            raise Corrupted(f"blob folder of {key} leads outside {self.root}")
        return path

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def write_atomic(self, key: str, write: WriteFn) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(temp, "wb") as f:
                write(f)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._pending.append(self._publisher.submit(self._publish, temp, final))

    def _publish(self, temp: Path, final: Path) -> None:
        try:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._dirty_dirs.add(final.parent)

    def sync(self) -> None:
        """Wait for pending publishes (raising the first failure), then fsync each touched folder once."""
        pending, self._pending = self._pending, []
        failures = [e for e in (f.exception() for f in pending) if e is not None]
        if failures:
            raise failures[0]
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in dirs:
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def open_mapped(self, key: str) -> MappedFile:
        try:
            return MappedFile(self._path(key), follow_symlinks=False)
        except FileNotFoundError:
            raise NotFound(f"blob file {key} is missing from {self.root}") from None
        except OSError as e:
            raise Corrupted(f"blob file {key} cannot be read ({e})") from None

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open_regular(path, follow_symlinks=False) as fd, open(fd, "rb", closefd=False) as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"blob file {key} is missing from {self.root}") from None
        except OSError as e:
            raise Corrupted(f"blob file {key} cannot be read ({e})") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def keys(self, older_than_s: float = 0.0) -> Iterator[str]:
        """Every file under the root, temporary ones included, last modified at least `older_than_s` ago."""
        if not self.root.exists():
            return
        cutoff = time.time() - older_than_s
        for path in self.root.rglob("*"):
            if path.is_file() and path.stat().st_mtime <= cutoff:
                yield path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    kind: str  # "tensor" | "file" | "factored"
    dtype: str | None
    shape: tuple[int, ...] | None
    nbytes: int  # a factored tensor's merged size: what a version's logical size counts
    written: bool  # False when the content was already in the store
    factors: Factors | None = None  # what a factored tensor staged just now is made of

    @property
    def location(self) -> str:
        """Where its file lives; a factored tensor has none ("")."""
        return "" if self.kind == FACTORED else blob_key(self.sha256, self.kind)

    @property
    def stored_bytes(self) -> int:
        """The bytes its own file takes (a factored tensor's live in its B and A blobs)."""
        return 0 if self.kind == FACTORED else self.nbytes

    def with_parts(self) -> list[StoredBlob]:
        """Itself, and the B and A blobs a factored tensor staged just now was written with."""
        return [self] if self.factors is None else [self, self.factors.B, self.factors.A]


@dataclass(frozen=True)
class Factors:
    """A factored tensor as staged (see `registry/factors.py`): base blob + scale * B @ A."""

    base: str
    B: StoredBlob
    A: StoredBlob
    scale: float
    depth: int


SHA256 = re.compile(r"[0-9a-f]{64}")
BLOB_KINDS = ("tensor", "file")
FACTORED = "factored"  # a tensor stored as factors over another blob; it has no file (see registry/factors.py)


def blob_key(sha256: str, kind: str) -> str:
    """Where a blob lives, derived from its hash: a location stored in a database row is never trusted."""
    if not SHA256.fullmatch(sha256) or kind not in BLOB_KINDS:
        raise Corrupted(f"blob row {shown(sha256)[:80]!r} ({shown(kind)[:20]}) is not a sha256 of a tensor or file")
    suffix = ".safetensors" if kind == "tensor" else ""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}{suffix}"


class BlobStore:
    def __init__(self, backend: BlobBackend):
        self.backend = backend

    def put_tensor(self, tensor: torch.Tensor, overwrite: bool = False) -> StoredBlob:
        """Store a tensor under its hash; `overwrite` rewrites (atomically) a copy found to be damaged."""
        dtype, shape = dtype_name(tensor.dtype), tuple(tensor.shape)
        data = tensor_bytes(tensor)
        sha = tensor_digest(dtype, shape, data)
        key = blob_key(sha, "tensor")
        written = overwrite or not self.backend.exists(key)
        if written:
            contiguous = tensor.detach().cpu().contiguous()
            self.backend.write_atomic(key, lambda f: write_tensors(f, {BLOB_TENSOR_NAME: contiguous}))
        return StoredBlob(sha, "tensor", dtype, shape, data.nbytes, written)

    def put_file(self, data: bytes) -> StoredBlob:
        sha = file_digest(data)
        key = blob_key(sha, "file")
        written = not self.backend.exists(key)
        if written:
            self.backend.write_atomic(key, lambda f: f.write(data))
        return StoredBlob(sha, "file", None, None, len(data), written)

    def sync(self) -> None:
        self.backend.sync()

    def get_tensor(self, sha256: str, verify: bool = True) -> torch.Tensor:
        mapped = self.backend.open_mapped(blob_key(sha256, "tensor"))
        info = self._tensor_info(mapped, sha256)
        if verify and tensor_digest(info.dtype, info.shape, mapped.view(info.start, info.end)) != sha256:
            raise Corrupted(f"blob {sha256[:12]} is damaged (content does not match its hash); run `zoo verify`")
        return mapped.tensor(info)

    def get_file(self, sha256: str, verify: bool = True) -> bytes:
        data = self.backend.read_bytes(blob_key(sha256, "file"))
        if verify and file_digest(data) != sha256:
            raise Corrupted(f"blob {sha256[:12]} is damaged (content does not match its hash); run `zoo verify`")
        return data

    def check(self, sha256: str, kind: str) -> str | None:
        """Recompute a blob's hash; None when intact, else what is wrong. Never blocks: a FIFO or device
        in a blob's place is reported, not opened for reading."""
        try:
            location = blob_key(sha256, kind)
            if kind == "file":
                return None if file_digest(self.backend.read_bytes(location)) == sha256 else "hash mismatch"
            mapped = self.backend.open_mapped(location)
            info = self._tensor_info(mapped, sha256)
            ok = tensor_digest(info.dtype, info.shape, mapped.view(info.start, info.end)) == sha256
            return None if ok else "hash mismatch"
        except NotFound:
            return "missing"
        except (Corrupted, ValueError) as e:
            return str(e)

    @staticmethod
    def _tensor_info(mapped: MappedFile, sha256: str) -> TensorInfo:
        try:
            header = read_header(mapped.path)
        except Exception as e:  # any header damage is corruption of a blob we wrote ourselves
            raise Corrupted(f"blob {sha256[:12]} is damaged ({e}); run `zoo verify`") from None
        if BLOB_TENSOR_NAME not in header.tensors:
            raise Corrupted(f"blob {sha256[:12]} is damaged (no tensor inside); run `zoo verify`")
        return header.tensors[BLOB_TENSOR_NAME]

    def delete(self, keys: Iterable[str]) -> int:
        count = 0
        for key in keys:
            self.backend.delete(key)
            count += 1
        return count
