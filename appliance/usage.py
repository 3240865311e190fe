"""The usage table: per hour, team, key, endpoint and model, the requests, tokens and errors
counted and the replica time spent. Written by three roles, each where it counts:
- the worker's sweeper rolls up what the api counted per request (`forwarder/rollup.py`);
- the worker adds each async task and batch request as it ends (`forwarder/worker/taskstore.py`);
- the builder adds each replica's running time and GPU-seconds (`builder/metering.py`).
Read by `GET /v1/usage` and the UI's usage page, which group the hours into days when asked.
"""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from sqlmodel import Session

from appliance.models import Endpoint

HOUR_S = 3600
DAY_S = 86400
GRANULARITIES = {"hour": HOUR_S, "day": DAY_S}
MAX_ROWS = 50_000  # grouped rows one read returns

_UPSERT = (
    "INSERT INTO usage (hour, team, key_id, endpoint, model, requests, prompt_tokens, "
    "completion_tokens, errors, replica_seconds, gpu_seconds) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (hour, team, key_id, endpoint, model) DO UPDATE SET "
    "requests = requests + excluded.requests, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "errors = errors + excluded.errors, "
    "replica_seconds = replica_seconds + excluded.replica_seconds, "
    "gpu_seconds = gpu_seconds + excluded.gpu_seconds"
)
# The name a user gave the model where there is one (a Hugging Face id, a file), else the path.
MODEL_OF_ENDPOINT = "COALESCE(json_extract(extra, '$.model_name'), model)"


@dataclass(frozen=True)
class Counts:
    """What one row adds; `key_id` is "" for replica time, which belongs to no key."""

    hour: int
    team: str
    key_id: str
    endpoint: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    replica_seconds: float = 0.0
    gpu_seconds: float = 0.0


def hour_of(stamp: float) -> int:
    return int(stamp // HOUR_S) * HOUR_S


def hour_pieces(start: float, end: float) -> list[tuple[int, float]]:
    """[start, end) cut at hour boundaries: (hour, seconds in it) for each hour it touches."""
    pieces = []
    at = start
    while at < end:
        hour = hour_of(at)
        stop = min(end, hour + HOUR_S)
        pieces.append((hour, stop - at))
        at = stop
    return pieces


def endpoint_model(endpoint: Endpoint) -> str:
    """`MODEL_OF_ENDPOINT` for a row in hand."""
    return str(endpoint.extra.get("model_name") or endpoint.model)


def driver(session: Session) -> sqlite3.Connection:
    """The sqlite3 connection under a session's transaction."""
    raw = session.connection().connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def add(conn: sqlite3.Connection, rows: Iterable[Counts]) -> None:
    """Add the rows' counts to the table, inside the caller's transaction."""
    conn.executemany(
        _UPSERT,
        [
            (
                r.hour,
                r.team,
                r.key_id,
                r.endpoint,
                r.model,
                r.requests,
                r.prompt_tokens,
                r.completion_tokens,
                r.errors,
                r.replica_seconds,
                r.gpu_seconds,
            )
            for r in rows
        ],
    )


def models_by_name(conn: sqlite3.Connection) -> dict[str, str]:
    """Each endpoint's model, by endpoint name."""
    query = f"SELECT name, {MODEL_OF_ENDPOINT} FROM endpoint"  # noqa: S608
    return {str(name): str(model) for name, model in conn.execute(query)}


@dataclass(frozen=True)
class Query:
    """A read of the table: [start, end) in whole periods of `granularity` seconds."""

    start: int
    end: int
    granularity: int = HOUR_S
    team: str | None = None
    endpoint: str | None = None
    key_id: str | None = None


@dataclass(frozen=True)
class Line:
    """One period of one (team, key, endpoint, model)."""

    period: int
    team: str
    key_id: str
    key_name: str
    endpoint: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    replica_seconds: float
    gpu_seconds: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def read(conn: sqlite3.Connection, query: Query) -> list[Line]:
    """The rows of `query`, grouped by period, oldest first; at most MAX_ROWS."""
    where = ["u.hour >= ?", "u.hour < ?"]
    args: list[Any] = [query.start, query.end]
    for column, value in (("team", query.team), ("endpoint", query.endpoint)):
        if value is not None:
            where.append(f"u.{column} = ?")
            args.append(value)
    if query.key_id is not None:
        where.append("u.key_id = ?")
        args.append(query.key_id)
    sql = (
        f"SELECT (u.hour / {query.granularity}) * {query.granularity} AS period, u.team, "  # noqa: S608
        "u.key_id, COALESCE(k.name, ''), u.endpoint, u.model, SUM(u.requests), "
        "SUM(u.prompt_tokens), SUM(u.completion_tokens), SUM(u.errors), "
        "SUM(u.replica_seconds), SUM(u.gpu_seconds) "
        "FROM usage u LEFT JOIN api_key k ON k.id = u.key_id "
        f"WHERE {' AND '.join(where)} "
        "GROUP BY period, u.team, u.key_id, u.endpoint, u.model "
        "ORDER BY period, u.team, u.endpoint, u.key_id, u.model "
        f"LIMIT {MAX_ROWS}"
    )
    return [Line(*row) for row in conn.execute(sql, args)]


TOTALS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors",
    "replica_seconds",
    "gpu_seconds",
)


def totals(lines: Sequence[Line]) -> dict[str, float]:
    out = {name: sum(getattr(line, name) for line in lines) for name in TOTALS}
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    return out


def as_dict(line: Line) -> dict[str, Any]:
    return {**asdict(line), "total_tokens": line.total_tokens}


# How a spreadsheet tells a formula from text: a cell starting with one of these
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def to_csv(lines: Sequence[Line], stamp: Any) -> str:
    """CSV with a header row; `stamp` turns a period start into its text (ISO 8601). A text
    cell a spreadsheet would run as a formula (a model name is any team's text, and an
    administrator's CSV holds every team's) starts with `'`, which spreadsheets read as text."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    names = [f.name for f in fields(Line)]
    writer.writerow([*names, "total_tokens"])
    for line in lines:
        row = as_dict(line)
        row["period"] = stamp(line.period)
        writer.writerow([_cell(row[name]) for name in [*names, "total_tokens"]])
    return out.getvalue()


def _cell(value: Any) -> Any:
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_START) else value
