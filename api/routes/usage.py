"""`GET /v1/usage`: requests, tokens, errors and replica time per hour or day, team, key,
endpoint and model, as JSON or CSV. A team's key sees its team's rows; an admin's sees every
team's and may filter by one. The UI's usage page reads the same function."""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from sqlmodel import Session

from api.deps import CallerDep, SessionDep, require
from appliance import usage
from appliance.errors import ForbiddenError, InvalidSpecError
from appliance.keys import Caller

router = APIRouter(tags=["usage"], dependencies=[require("manage")])
DEFAULT_SPAN_S = 7 * 86400
MAX_SPAN_S = 400 * 86400
LAST_STAMP = 253402300799  # 9999-12-31T23:59:59Z


def parse_time(value: str | None, name: str) -> float | None:
    """An ISO 8601 date or time (UTC unless it says otherwise) or Unix seconds."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        stamp = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            stamp = math.nan
        else:
            stamp = (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    if not 0 <= stamp <= LAST_STAMP:  # also refuses nan
        raise InvalidSpecError(
            f"{name} must be an ISO 8601 date or time (2026-11-28, 2026-11-28T14:00:00Z) or "
            f"Unix seconds, from 1970 to 9999, not {text!r}",
            field=name,
        )
    return stamp


def iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def usage_query(
    caller: Caller,
    *,
    team: str | None,
    endpoint: str | None,
    key: str | None,
    start: float | None,
    end: float | None,
    granularity: str,
    now: float,
) -> usage.Query:
    """The read a caller may make: its own team's rows unless it is an admin; whole periods."""
    if team is not None and not caller.owns(team):
        raise ForbiddenError("only an administrator may read another team's usage")
    if not caller.is_admin:
        team = caller.team  # a team's key reads its own rows only
    step = usage.GRANULARITIES[granularity]
    stop = math.ceil((end if end is not None else now) / step) * step
    first = (start if start is not None else stop - DEFAULT_SPAN_S) // step * step
    if first >= stop:
        raise InvalidSpecError("from must be before to", field="from")
    if stop - first > MAX_SPAN_S:
        raise InvalidSpecError(f"at most {MAX_SPAN_S // 86400} days at once", field="from")
    return usage.Query(int(first), int(stop), step, team, endpoint, key)


def read_lines(session: Session, query: usage.Query) -> list[usage.Line]:
    return usage.read(usage.driver(session), query)


@router.get(
    "/v1/usage",
    responses={
        200: {
            "description": "Usage rows and totals (JSON), or the rows as CSV with format=csv.",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
def read_usage(
    caller: CallerDep,
    session: SessionDep,
    team: str | None = None,
    endpoint: str | None = None,
    key: str | None = Query(None, description="A key's id (key_...)."),
    start: str | None = Query(None, alias="from", description="ISO 8601 or Unix seconds."),
    end: str | None = Query(None, alias="to", description="ISO 8601 or Unix seconds."),
    granularity: Literal["hour", "day"] = "hour",
    format: Literal["json", "csv"] = "json",
) -> Response:
    query = usage_query(
        caller,
        team=team,
        endpoint=endpoint,
        key=key,
        start=parse_time(start, "from"),
        end=parse_time(end, "to"),
        granularity=granularity,
        now=time.time(),
    )
    lines = read_lines(session, query)
    if format == "csv":
        return Response(
            usage.to_csv(lines, iso),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="usage.csv"'},
        )
    body: dict[str, Any] = {
        "object": "usage",
        "granularity": granularity,
        "from": iso(query.start),
        "to": iso(query.end),
        "team": query.team,
        "data": [{**usage.as_dict(line), "period": iso(line.period)} for line in lines],
        "totals": usage.totals(lines),
    }
    return JSONResponse(body)
