"""Small inline-SVG bar charts: points in, bars and labels out (the template draws them), so a
page with charts costs no script and no extra request. Bars rather than lines, so that one
busy 10-second bucket in a quiet hour still shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 300
HEIGHT = 80
MIN_BAR_WIDTH = 1.5  # in viewBox units; a bucket is narrower than that over an hour


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    bars: list[Bar]
    top: str  # the highest value, formatted
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


def bar_chart(
    title: str,
    unit: str,
    points: Sequence[tuple[float, float]],
    start: float,
    end: float,
    step_s: float,
) -> Chart:
    """Bars of `points` (bucket start, value) over [start, end]; empty when all are zero."""
    top = max((v for _, v in points), default=0.0)
    if top <= 0 or end <= start:
        return Chart(title, unit, [], "", "", True)
    scale_x = WIDTH / (end - start)
    width = max(step_s * scale_x, MIN_BAR_WIDTH)
    bars = []
    for t, v in points:
        if v <= 0 or t + step_s < start:
            continue
        height = max(v / (top * 1.1) * HEIGHT, 1.0)
        x = min(max((t - start) * scale_x, 0.0), WIDTH - width)
        bars.append(Bar(round(x, 2), round(HEIGHT - height, 2), round(width, 2), round(height, 2)))
    return Chart(title, unit, bars, _fmt(top), _fmt(points[-1][1]), False)
