"""The web UI's usage and audit pages, through the REST routes' own reads: usage by team, key
and endpoint with a chart per team and per endpoint (and its CSV), for the signed-in team or,
for an admin, every team; the audit log, for admins. Included by `api.routes.ui`."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api import oversight
from api.deps import SessionDep
from api.routes.ui.respond import need, page
from api.ui_session import SignedInDep
from appliance import audit, usage
from appliance.errors import ApplianceError
from web import reports

router = APIRouter(prefix="/ui", include_in_schema=False)
RANGES = {"hour": 24 * 3600, "day": 30 * 86400}  # what the page shows at each granularity
UNITS = {"hour": "tok/h", "day": "tok/day"}
AUDIT_ROWS = 200
AUDIT_ACTIONS = audit.KINDS


def _query(ui: SignedInDep, granularity: str, team: str | None) -> usage.Query:
    now = time.time()
    return oversight.usage_query(
        ui.caller,
        team=team or None,
        endpoint=None,
        key=None,
        start=now - RANGES[granularity],
        end=now,
        granularity=granularity,
        now=now,
    )


@router.get("/usage")
def read_usage_page(
    request: Request,
    ui: SignedInDep,
    session: SessionDep,
    granularity: Literal["hour", "day"] = "hour",
    team: str | None = None,
) -> Response:
    need(ui.caller, "manage")
    try:
        query = _query(ui, granularity, team)
    except ApplianceError as exc:
        return page(
            request, "notfound.html", ui, status=403, heading="Not allowed", message=exc.message
        )
    lines = oversight.read_lines(session, query)
    window = {"start": query.start, "end": query.end, "step": query.granularity}
    unit = UNITS[granularity]
    return page(
        request,
        "usage.html",
        ui,
        "usage",
        granularity=granularity,
        team=query.team,
        teams=reports.by_team(lines),
        rows=reports.by_key_and_endpoint(lines),
        team_charts=reports.token_charts(lines, lambda x: x.team, unit=unit, **window),
        endpoint_charts=reports.token_charts(lines, lambda x: x.endpoint, unit=unit, **window),
        since=query.start,
    )


@router.get("/usage.csv")
def read_usage_csv(
    ui: SignedInDep,
    session: SessionDep,
    granularity: Literal["hour", "day"] = "hour",
    team: str | None = None,
) -> Response:
    need(ui.caller, "manage")
    return oversight.csv_reply(oversight.read_lines(session, _query(ui, granularity, team)))


@router.get("/audit")
def read_audit_page(
    request: Request,
    ui: SignedInDep,
    session: SessionDep,
    action: str | None = None,
    before: int | None = Query(None, ge=1, le=oversight.MAX_ID),
) -> Response:
    if not ui.caller.is_admin:
        message = "Only administrators see the audit log."
        return page(
            request, "notfound.html", ui, status=403, heading="Not allowed", message=message
        )
    found = audit.entries(session, action=action or None, before_id=before, limit=AUDIT_ROWS)
    rows = [oversight.entry_public(e) for e in found]
    for row in rows:
        row["change_text"] = reports.change_text(row["change"])
        row["change_short"] = reports.short(row["change_text"])
    older = rows[-1]["id"] if len(rows) == AUDIT_ROWS else None
    return page(
        request,
        "audit.html",
        ui,
        "audit",
        rows=rows,
        action=action or "",
        actions=AUDIT_ACTIONS,
        older=older,
    )
