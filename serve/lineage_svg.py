"""A version's lineage drawn on the server as SVG: ancestors to the left, descendants to the right, one
column per generation, an arrow from each parent to each child, every box a link to its version page."""

from __future__ import annotations

from collections.abc import Callable
from html import escape
from urllib.parse import quote

from modelzoo.registry.records import Lineage

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 170, 40, 56, 14, 10
MAX_NODES = 120  # the nearest generations; a page of thousands of boxes helps nobody


def lineage_svg(lineage: Lineage, parents_of: Callable[[str], list[str]]) -> str:
    """`parents_of(ref)` gives a version's parents' refs; only edges between drawn versions are drawn."""
    nodes = [(lineage.ref, 0, "", "")]
    nodes += [(n.ref, -n.depth, n.relation, n.method) for n in lineage.ancestors]
    nodes += [(n.ref, n.depth, n.relation, n.method) for n in lineage.descendants]
    nodes = sorted(nodes, key=lambda node: abs(node[1]))[:MAX_NODES]
    columns = sorted({depth for _, depth, _, _ in nodes})
    place: dict[str, tuple[float, float]] = {}
    rows_in: dict[int, int] = {}
    for ref, depth, _, _ in nodes:
        row = rows_in.get(depth, 0)
        rows_in[depth] = row + 1
        place[ref] = (PAD + columns.index(depth) * (BOX_W + GAP_X), PAD + row * (BOX_H + GAP_Y))
    width = PAD * 2 + len(columns) * BOX_W + (len(columns) - 1) * GAP_X
    height = PAD * 2 + max(rows_in.values()) * (BOX_H + GAP_Y) - GAP_Y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage of {escape(lineage.ref)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#666"/></marker></defs>',
    ]
    for ref in place:
        cx, cy = place[ref]
        for parent in parents_of(ref):
            if parent in place:
                px, py = place[parent]
                parts.append(f'<line x1="{px + BOX_W}" y1="{py + BOX_H / 2}" x2="{cx}" y2="{cy + BOX_H / 2}" '
                             'stroke="#666" marker-end="url(#arrow)"/>')
    for ref, _, relation, method in nodes:
        x, y = place[ref]
        current = ref == lineage.ref
        detail = " · ".join(part for part in (relation, method) if part) or "this version"
        parts.append(
            f'<a href="/v/{quote(ref, safe="@")}"><title>{escape(ref)} ({escape(detail)})</title>'
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
            f'fill="{"#ffe9a8" if current else "#eef3fb"}" stroke="{"#b07d00" if current else "#6b8bbd"}"/>'
            f'<text x="{x + 8}" y="{y + 17}" font-size="13" font-weight="{"bold" if current else "normal"}">'
            f'{escape(_clipped(ref))}</text>'
            f'<text x="{x + 8}" y="{y + 32}" font-size="11" fill="#555">{escape(_clipped(detail))}</text></a>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _clipped(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
