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


@dataclass(frozen=True)
class LowRank:
    """A change `scale * B @ A` of one tensor whose first dimension is m and whose other dimensions
    flatten to n (a conv kernel's (out, in, kh, kw) is (out, in * kh * kw)); what editors and adapter
    imports hand the registry instead of a dense tensor when their change is low-rank."""

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
        if not shape or B.shape[0] != shape[0] or B.shape[0] * A.shape[1] != _numel(shape):
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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def merge(base: torch.Tensor, change: LowRank, in_place: bool = False) -> torch.Tensor:
    """base + scale * B @ A in float32 (float64 for float64 tensors), returned in the base's dtype.

    `in_place` writes into `base` when its dtype allows, which saves a full copy; only for a base that no
    one else holds (a fresh copy-on-write map of a blob, or a merge's own result)."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    m = base.shape[0]
    B, A = change.B.to(acc), change.A.to(acc)
    if in_place and base.dtype == acc and base.is_contiguous():
        base.view(m, -1).addmm_(B, A, alpha=change.scale)
        return base
    merged = torch.addmm(base.reshape(m, -1).to(acc), B, A, alpha=change.scale)
    return merged.reshape(base.shape).to(base.dtype)


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
