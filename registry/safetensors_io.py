"""Read and write the safetensors format without trusting the file and without extra copies.

Imports come from users, so every header is checked before a byte of data is used: its length, its
JSON, each tensor's dtype, shape and offsets (inside the file, exactly dtype x shape long, not
overlapping). Tensors are returned as memory maps; writes stream the tensor's bytes straight to disk.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from modelzoo.registry.errors import BadInput
from modelzoo.registry.files import NotRegular, open_regular
from modelzoo.registry.untrusted import parse_json

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 16
MAX_DIM = 2**40  # per dimension; torch refuses shapes whose element count leaves int64


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; raise BadInput naming the file and the problem."""
    try:
        with open_regular(path) as fd:
            size = os.fstat(fd).st_size
            prefix = os.pread(fd, 8, 0)
            if len(prefix) < 8:
                raise BadInput(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise BadInput(f"{path}: truncated or malformed safetensors (header length {header_len} > file)")
            raw = os.pread(fd, header_len, 8)
    except NotRegular as e:
        raise BadInput(str(e)) from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    header = parse_json(raw, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise BadInput(f"{path}: malformed safetensors header (not a JSON object)")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInput(f"{path}: safetensors __metadata__ must be an object of strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_start, data_size)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise BadInput(f"{path}: safetensors header lies: tensors {name_a!r} and {name_b!r} overlap")
    return Header(path=path, tensors=tensors, metadata=dict(metadata))


def _check_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    def bad(why: str) -> BadInput:
        return BadInput(f"{path}: safetensors header lies about tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"unknown dtype {dtype!r:.40}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
        raise bad(f"bad shape {shape!r:.120}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise bad(f"bad data_offsets {offsets!r:.120}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets {offsets} outside the {data_size} data bytes (truncated file?)")
    expected = math.prod(shape) * DTYPES[dtype].itemsize  # Python integers: no overflow to wrap around
    if end - begin != expected:
        raise bad(f"{end - begin} bytes for shape {shape} of {dtype} (expected {expected})")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


class MappedFile:
    """A read-only memory map of one regular file; tensors made from it share its pages (copy-on-write)."""

    def __init__(self, path: Path, follow_symlinks: bool = True):
        self.path = path
        with open_regular(path, follow_symlinks) as fd:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None

    def view(self, start: int, end: int) -> memoryview:
        if self._map is None:
            return memoryview(b"")
        return memoryview(self._map)[start:end]

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        raw = torch.frombuffer(self.view(info.start, info.end), dtype=torch.uint8)
        return raw.view(DTYPES[info.dtype]).reshape(info.shape)


def iter_tensors(path: Path) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
    header = read_header(path)
    mapped = MappedFile(path)
    for info in sorted(header.tensors.values(), key=lambda t: t.start):
        yield info, mapped.tensor(info)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (contiguous tensors), in safetensors' little-endian order."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _header_bytes(entries: Iterable[tuple[str, str, tuple[int, ...], int]], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_tensors(f: BinaryIO, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] = ()) -> int:
    """Stream tensors into an open file in safetensors format; returns bytes written."""
    views = {name: tensor_bytes(t) for name, t in tensors.items()}
    entries = [(n, dtype_name(t.dtype), tuple(t.shape), views[n].nbytes) for n, t in tensors.items()]
    head = _header_bytes(entries, dict(metadata))
    f.write(head)
    total = len(head)
    for view in views.values():
        f.write(view)
        total += view.nbytes
    return total


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise BadInput(f"dtype {dtype} cannot be stored in safetensors") from None
