"""Small inline-SVG line charts: points in, an SVG path and its labels out (the template
draws them), so a page with charts costs no script and no request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 300
HEIGHT = 80


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    line: str  # SVG path data of the line
    area: str  # the same, closed to the bottom, for a soft fill
    top: str  # the y axis's top value, formatted
    latest: str  # the last point's value, formatted
    empty: bool


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def line_chart(
    title: str, unit: str, points: Sequence[tuple[float, float]], start: float, end: float
) -> Chart:
    """A chart of `points` (time, value) over [start, end]; empty when there are none."""
    if not points or end <= start:
        return Chart(title, unit, "", "", "", "", True)
    top = max(v for _, v in points) or 1.0
    top *= 1.1  # headroom so the peak does not touch the frame

    def xy(t: float, v: float) -> str:
        x = (t - start) / (end - start) * WIDTH
        y = HEIGHT - v / top * HEIGHT
        return f"{max(0.0, min(WIDTH, x)):.1f},{y:.1f}"

    coords = [xy(t, v) for t, v in points]
    line = "M" + " L".join(coords)
    first_x = coords[0].split(",")[0]
    last_x = coords[-1].split(",")[0]
    area = f"{line} L{last_x},{HEIGHT} L{first_x},{HEIGHT} Z"
    return Chart(title, unit, line, area, _fmt(top / 1.1), _fmt(points[-1][1]), False)
