"""View models of the usage and audit pages: pure functions over the usage table's lines and
the audit log's entries, called by `api.routes.ui.operators`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.usage import Line
from web import charts

CHANGE_SHOWN_CHARS = 160


@dataclass(frozen=True)
class Totals:
    """One row of a usage table: a team, or a team's key on an endpoint and model."""

    team: str
    key: str
    key_id: str
    endpoint: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    replica_hours: float
    gpu_hours: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _sum(group: Sequence[Line], **labels: str) -> Totals:
    return Totals(
        team=labels.get("team", ""),
        key=labels.get("key", ""),
        key_id=labels.get("key_id", ""),
        endpoint=labels.get("endpoint", ""),
        model=labels.get("model", ""),
        requests=sum(x.requests for x in group),
        prompt_tokens=sum(x.prompt_tokens for x in group),
        completion_tokens=sum(x.completion_tokens for x in group),
        errors=sum(x.errors for x in group),
        replica_hours=sum(x.replica_seconds for x in group) / 3600,
        gpu_hours=sum(x.gpu_seconds for x in group) / 3600,
    )


def _grouped(lines: Iterable[Line], key: Callable[[Line], Any]) -> dict[Any, list[Line]]:
    groups: dict[Any, list[Line]] = {}
    for line in lines:
        groups.setdefault(key(line), []).append(line)
    return groups


def by_team(lines: Sequence[Line]) -> list[Totals]:
    groups = _grouped(lines, lambda x: x.team)
    return [_sum(group, team=team) for team, group in sorted(groups.items())]


def by_key_and_endpoint(lines: Sequence[Line]) -> list[Totals]:
    """Requests per team, key, endpoint and model; replica time (no key) on rows of its own."""
    groups = _grouped(
        lines, lambda x: (x.team, x.key_name or x.key_id, x.key_id, x.endpoint, x.model)
    )
    return [
        _sum(group, team=team, key=key, key_id=key_id, endpoint=endpoint, model=model)
        for (team, key, key_id, endpoint, model), group in sorted(groups.items())
    ]


def token_charts(
    lines: Sequence[Line],
    label: Callable[[Line], str],
    *,
    start: float,
    end: float,
    step: int,
    unit: str,
) -> list[charts.Chart]:
    """One bar chart of tokens per period for each value of `label` (team, endpoint)."""
    out = []
    for name, group in sorted(_grouped(lines, label).items()):
        per_period: dict[int, float] = {}
        for line in group:
            per_period[line.period] = per_period.get(line.period, 0.0) + line.total_tokens
        points = [(float(p), per_period.get(p, 0.0)) for p in range(int(start), int(end), step)]
        out.append(charts.bar_chart(name, unit, points, start, end, step))
    return out


def change_text(change: Mapping[str, Any]) -> str:
    """An audit entry's change, compact, for a table cell (the title holds all of it)."""
    text = json.dumps(change, ensure_ascii=False, separators=(", ", ": "), default=str)
    return "" if text == "{}" else text


def short(text: str) -> str:
    if len(text) <= CHANGE_SHOWN_CHARS:
        return text
    return text[: CHANGE_SHOWN_CHARS - 1] + "…"
