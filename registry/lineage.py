"""Lineage and comparison queries. Transitive walks run in SQL (recursive CTEs), not Python loops."""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.orm import Session

from modelzoo.registry.records import Diff, Lineage, LineageNode, TensorChange
from modelzoo.registry.refs import resolve
from modelzoo.registry.store import Registry

_WALK = """
WITH RECURSIVE walk(id, relation, depth) AS (
    SELECT {next}, relation, 1 FROM version_parents WHERE {this} = :start
    UNION ALL
    SELECT e.{next}, e.relation, w.depth + 1 FROM version_parents e JOIN walk w ON e.{this} = w.id
)
SELECT m.name, v.number, w.relation, p.method, p.params, w.depth
FROM (SELECT id, MIN(depth) AS depth FROM walk GROUP BY id) nearest
JOIN walk w ON w.id = nearest.id AND w.depth = nearest.depth
JOIN versions v ON v.id = w.id
JOIN models m ON m.id = v.model_id
JOIN provenance p ON p.version_id = v.id
ORDER BY w.depth, m.name, v.number
"""
ANCESTORS = _WALK.format(next="parent_id", this="child_id")
DESCENDANTS = _WALK.format(next="child_id", this="parent_id")


def _walk(session: Session, query: str, version_id: int) -> list[LineageNode]:
    nodes: dict[str, LineageNode] = {}
    for name, number, relation, method, params, depth in session.execute(text(query), {"start": version_id}):
        ref = f"{name}@{number}"
        if ref not in nodes:  # a diamond reaches one version by two edges; keep the nearest
            params = json.loads(params) if isinstance(params, str) else params  # SQLite returns JSON as text
            nodes[ref] = LineageNode(ref, relation, method, params or {}, depth)
    return list(nodes.values())


def lineage(registry: Registry, ref: str) -> Lineage:
    with registry.db.read() as session:
        version = resolve(session, ref, include_deleted=True)
        return Lineage(
            ref=f"{version.model.name}@{version.number}",
            ancestors=_walk(session, ANCESTORS, version.id),
            descendants=_walk(session, DESCENDANTS, version.id),
        )


def diff(registry: Registry, a: str, b: str) -> Diff:
    """Which tensors differ between two versions, with ||B - A|| / ||A|| for each changed one."""
    left, right = registry.manifest(a), registry.manifest(b)
    left_t = {n: blob for (k, n), blob in left.items() if k == "tensor"}
    right_t = {n: blob for (k, n), blob in right.items() if k == "tensor"}
    changed: list[TensorChange] = []
    unchanged = 0
    for name in sorted(left_t.keys() | right_t.keys()):
        if name not in right_t:
            changed.append(TensorChange(name, "removed", None))
        elif name not in left_t:
            changed.append(TensorChange(name, "added", None))
        elif left_t[name].sha256 == right_t[name].sha256:
            unchanged += 1
        else:
            x = registry.tensor_by_sha(left_t[name].sha256).double()
            y = registry.tensor_by_sha(right_t[name].sha256).double()
            if x.shape != y.shape:
                changed.append(TensorChange(name, "reshaped", None))
                continue
            base = float(x.norm())
            delta = float((y - x).norm())
            changed.append(TensorChange(name, "changed", delta / base if base else float("inf")))
    info_a, info_b = registry.info(a), registry.info(b)
    return Diff(info_a.ref, info_b.ref, changed, unchanged)
