"""The lambda sweep of a circuit analysis drawn as a PNG: circuit size against desiderata accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont


def sweep_plot(rows: Sequence[dict[str, Any]], title: str, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """One point per lambda (rows of `lambda`, `components`, `desiderata_accuracy`), joined in order of
    circuit size and labelled with their lambda, above and below in turn; with `ablated_accuracy` in the
    rows, the task accuracy with each circuit mean-ablated as a second line."""
    width, height = size
    left, right, top, bottom = 50, 30, 66, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.font = ImageFont.load_default(size=12)
    most = max(5, 5 * math.ceil(1.1 * max(int(r["components"]) for r in rows) / 5))

    def point(count: float, accuracy: float) -> tuple[float, float]:
        return (left + (width - left - right) * count / most,
                top + (height - top - bottom) * (1 - accuracy))

    draw.text((left, 8), title, fill="black")
    draw.text((left, 26), "desiderata accuracy on held-out pairs against circuit size", fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for i in range(6):
        y = point(0, i / 5)[1]
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((8, y - 6), f"{i / 5:.1f}", fill="black")
    for i in range(6):
        x = point(most * i / 5, 0)[0]
        draw.line((x, height - bottom, x, height - bottom + 4), fill="black")
        draw.text((x - 6, height - bottom + 6), f"{most * i / 5:.0f}", fill="black")
    draw.text(((left + width - right) // 2 - 60, height - 16), "circuit size (components)", fill="black")
    ordered = sorted(rows, key=lambda r: (r["components"], r["lambda"]))
    if all("ablated_accuracy" in r for r in ordered):
        ablated = [point(r["components"], r["ablated_accuracy"]) for r in ordered]
        if len(ablated) > 1:
            draw.line(ablated, fill=(40, 160, 90), width=2)
        for x, y in ablated:
            draw.rectangle((x - 3, y - 3, x + 3, y + 3), fill=(40, 160, 90))
        draw.text((width - right - 300, height - bottom - 18), "green: task accuracy, circuit mean-ablated",
                  fill=(40, 160, 90))
    points = [point(r["components"], r["desiderata_accuracy"]) for r in ordered]
    if len(points) > 1:
        draw.line(points, fill=(40, 80, 200), width=2)
    for i, (r, (x, y)) in enumerate(zip(ordered, points, strict=True)):
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(200, 40, 40))
        draw.text((x - 20, y + 8 if i % 2 else y - 20), f"lambda {r['lambda']:g}", fill="black")
    return image
