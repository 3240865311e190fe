"""What operators read, for the usage and audit routes and the UI's operator pages: usage
queries bounded to whole periods and to the caller's team, audit entries as shown."""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import Response
from sqlmodel import Session

from api.times import LAST_STAMP, iso
from appliance import usage
from appliance.errors import ForbiddenError, InvalidSpecError
from appliance.keys import Caller
from appliance.models import AuditEntry

MANAGE = "manage"  # the scope that reads a team's usage; without it, a key reads its own

DEFAULT_SPAN_S = 7 * 86400

MAX_SPAN_S = 400 * 86400


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
    """The read a caller may make: its own team's rows unless it is an admin, its own key's
    alone without the `manage` scope (an inference-only key learns what it used itself);
    whole periods."""
    if team is not None and not caller.owns(team):
        raise ForbiddenError("only an administrator may read another team's usage")
    if not caller.is_admin:
        team = caller.team  # a team's key reads its own rows only
    if not caller.can(MANAGE):
        if key is not None and key != caller.key_id:
            raise ForbiddenError(
                f"a key without the {MANAGE!r} scope reads its own usage only: leave `key` out"
            )
        key = caller.key_id
    step = usage.GRANULARITIES[granularity]
    # rounded up to a whole period, but never past the last one shown in year 9999
    stop = min(math.ceil((end if end is not None else now) / step), LAST_STAMP // step) * step
    first = (start if start is not None else stop - DEFAULT_SPAN_S) // step * step
    if first >= stop:
        raise InvalidSpecError("from must be before to", field="from")
    if stop - first > MAX_SPAN_S:
        raise InvalidSpecError(f"at most {MAX_SPAN_S // 86400} days at once", field="from")
    return usage.Query(int(first), int(stop), step, team, endpoint, key)


def read_lines(session: Session, query: usage.Query) -> list[usage.Line]:
    return usage.read(usage.driver(session), query)


def csv_reply(lines: list[usage.Line]) -> Response:
    """The usage rows as the CSV file `GET /v1/usage?format=csv` and the UI's link download."""
    return Response(
        usage.to_csv(lines, iso),
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": 'attachment; filename="usage.csv"'},
    )


MAX_ID = 2**62  # SQLite's integers


def entry_public(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": iso(entry.at),
        "timestamp": entry.at,
        "actor": entry.actor,
        "team": entry.team,
        "actor_key_id": entry.actor_key_id,
        "action": entry.action,
        "target": entry.target,
        "change": entry.change,
        "address": entry.address,
    }
