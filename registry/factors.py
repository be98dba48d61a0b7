"""Factored tensors: a version's tensor stored as its parent's tensor plus a low-rank change,
W = W_parent + scale * B @ A, with B (m, r) and A (r, n) as ordinary blobs.

A factored tensor is a blob row of kind "factored" with no file of its own; its `blob_factors` row names
the base blob, B, A and the scale. Its sha256 is that of the merged tensor (dtype, shape and bytes, as for
any tensor) as computed when it was stored, so manifests, `diff`, `find` and deduplication treat it like
the dense tensor it stands for. Its integrity rests on the blobs it is made of: loading and `verify`
check B, A and the base by their own hashes. The merge is not re-hashed, because a float matmul may round
differently in the last bit on another machine or thread count, and that must not read as damage.

Depth policy: a factored tensor's base may itself be factored, but the chain down to a dense blob is at
most MAX_DEPTH links long; the change that would make it longer is merged and stored dense. So a chain of
low-rank edits loads with at most MAX_DEPTH small matmuls per tensor, and every MAX_DEPTH + 1-th version
in a chain pays for one dense copy. A change whose factors would take at least the dense tensor's bytes
is also stored dense: factoring it saves nothing and costs a merge at every load.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import Select, literal, or_, select
from sqlalchemy.orm import Session

from modelzoo.registry.errors import BadInput
from modelzoo.registry.schema import BlobFactors

MAX_DEPTH = 4
MAX_FACTOR_FRACTION = 1.0  # of the dense tensor's bytes; from there on the change is stored dense
HUGE_PAGES_FROM = 8 * 2**20  # bytes


@dataclass(frozen=True)
class LowRank:
    """A change `scale * B @ A` of one tensor; what editors and adapter imports hand the registry instead
    of a dense tensor when their change is low-rank. The product is read in one of two layouts, told
    apart by the factors' shapes:
    - rows: B (m, r), A (r, n), m the tensor's first dimension and n the product of the others (a conv
      kernel (out, in, kh, kw) as (out, in * kh * kw): LoRA's layout);
    - conv input: B (out * kh * kw, r), A (r, in), for a kernel (out, in, kh, kw) whose change mixes input
      channels only (GAN warping's Delta[o, i, h, w] = sum_r Lambda[o, r, h, w] D[r, i]).
    For a 1x1 kernel the two are the same matrix."""

    B: torch.Tensor  # (m, r)
    A: torch.Tensor  # (r, n)
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        return self.B.numel() * self.B.element_size() + self.A.numel() * self.A.element_size()

    def check(self, shape: tuple[int, ...], what: str) -> None:
        """BadInput unless the factors are float matrices of one rank whose product has `shape`."""
        B, A = self.B, self.A
        if B.ndim != 2 or A.ndim != 2 or not B.is_floating_point() or not A.is_floating_point():
            raise BadInput(f"{what}: low-rank factors must be float matrices, got B {tuple(B.shape)} {B.dtype} "
                           f"and A {tuple(A.shape)} {A.dtype}")
        if B.shape[1] != A.shape[0]:
            raise BadInput(f"{what}: factor ranks disagree (B has {B.shape[1]} columns, A has {A.shape[0]} rows)")
        if not (_rows_layout(B, A, shape) or _conv_input_layout(B, A, shape)):
            raise BadInput(f"{what}: B {tuple(B.shape)} @ A {tuple(A.shape)} does not fit the tensor's shape "
                           f"{tuple(shape)}")
        if not isinstance(self.scale, int | float) or not torch.isfinite(torch.tensor(float(self.scale))):
            raise BadInput(f"{what}: scale {self.scale!r} is not a finite number")

    def cat(self, other: LowRank) -> LowRank:
        """The sum of two changes of one tensor: their factors side by side (ranks add)."""
        dtype = torch.promote_types(self.B.dtype, other.B.dtype)
        return LowRank(
            torch.cat([self.B.to(dtype) * self.scale, other.B.to(dtype) * other.scale], dim=1),
            torch.cat([self.A.to(dtype), other.A.to(dtype)], dim=0),
        )


def _rows_layout(B: torch.Tensor, A: torch.Tensor, shape: tuple[int, ...]) -> bool:
    return bool(shape) and B.shape[0] == shape[0] and B.shape[0] * A.shape[1] == _numel(shape)


def _conv_input_layout(B: torch.Tensor, A: torch.Tensor, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 3 and A.shape[1] == shape[1] and B.shape[0] * shape[1] == _numel(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def merge(base: torch.Tensor, change: LowRank) -> torch.Tensor:
    """base + scale * B @ A in float32 (float64 for float64 tensors), returned in the base's dtype, in new
    memory. Every merge, when stored and when loaded, goes through here, so it rounds the same way."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    m = base.shape[0]
    B, A = change.B.to(acc), change.A.to(acc)
    out = fresh_tensor(tuple(base.shape), acc)
    if _rows_layout(B, A, tuple(base.shape)):
        torch.addmm(base.reshape(m, -1).to(acc), B, A, alpha=change.scale, out=out.view(m, -1))
    else:  # conv input layout: the product is (out, kh, kw, in)
        product = (B @ A).reshape(m, *base.shape[2:], base.shape[1]).movedim(-1, 1)
        torch.add(base.to(acc), product, alpha=change.scale, out=out)
    return out if base.dtype == acc else out.to(base.dtype)


def fresh_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised memory for a merge. A large one is asked for in huge pages: writing 1 GB into fresh
    4 KiB pages costs more in page faults than the merge's arithmetic (measured 0.35 s against 0.15 s for
    a 4096 x 16384 float32 matrix)."""
    nbytes = _numel(shape) * dtype.itemsize
    if nbytes < HUGE_PAGES_FROM or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def worth_factoring(change: LowRank, shape: tuple[int, ...], itemsize: int, base_depth: int) -> bool:
    """The depth and size policy of the module docstring."""
    return base_depth < MAX_DEPTH and change.nbytes < MAX_FACTOR_FRACTION * _numel(shape) * itemsize


@dataclass(frozen=True)
class FactorRow:
    sha256: str
    base: str
    b: str
    a: str
    scale: float
    depth: int


def factor_rows(session: Session, shas: Iterable[str]) -> dict[str, FactorRow]:
    """The factor rows of these blobs and of the factored bases beneath them, by blob hash."""
    rows: dict[str, FactorRow] = {}
    wanted = set(shas)
    while wanted:
        found: list[Any] = []
        listed = sorted(wanted)
        for i in range(0, len(listed), 500):
            found += session.scalars(select(BlobFactors).where(BlobFactors.sha256.in_(listed[i : i + 500])))
        wanted = set()
        for f in found:
            rows[f.sha256] = FactorRow(f.sha256, f.base_sha256, f.b_sha256, f.a_sha256, f.scale, f.depth)
            if f.base_sha256 not in rows:
                wanted.add(f.base_sha256)
    return rows


def with_parts(roots: Any) -> Any:
    """Every blob that the blobs `roots` selects are made of, themselves included: down each factored
    blob's chain of bases, and each factored blob's B and A (recursive SQL, one query)."""
    start = roots.subquery("factor_roots")
    chain = select(start.c[0].label("sha")).cte("factor_chain", recursive=True)
    chain = chain.union(select(BlobFactors.base_sha256).join(chain, BlobFactors.sha256 == chain.c.sha))
    in_chain = BlobFactors.sha256.in_(select(chain.c.sha))
    return select(chain.c.sha).union(select(BlobFactors.b_sha256).where(in_chain),
                                     select(BlobFactors.a_sha256).where(in_chain))


def made_from(sha256: str) -> Select[Any]:
    """The blob itself and every factored blob built on it (as base, B or A) at any depth."""
    users = select(literal(sha256).label("sha")).cte("factor_users", recursive=True)
    users = users.union(select(BlobFactors.sha256).join(users, or_(
        BlobFactors.base_sha256 == users.c.sha, BlobFactors.b_sha256 == users.c.sha,
        BlobFactors.a_sha256 == users.c.sha)))
    return select(users.c.sha)
