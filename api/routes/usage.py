"""`GET /v1/usage`: requests, tokens, errors and replica time per hour or day, team, key,
endpoint and model, as JSON or CSV. A team's key sees its team's rows; an admin's sees every
team's and may filter by one; a key without the `manage` scope sees its own rows alone. The
UI's usage page reads the same function."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from api import oversight
from api.deps import CallerDep, SessionDep
from api.oversight import read_lines, usage_query
from api.times import iso, parse_time
from appliance import usage

router = APIRouter(tags=["usage"])  # a key without `manage` reads its own key's rows


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
        return oversight.csv_reply(lines)
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
