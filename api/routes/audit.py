"""`GET /v1/audit`: the audit log, newest first, for administrators; filters by actor, action
(a prefix: `key.`), target and time, and pages with `before`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from api.deps import CallerDep, SessionDep
from api.oversight import MAX_ID, entry_public
from api.times import parse_time
from appliance import audit
from appliance.errors import ForbiddenError

router = APIRouter(tags=["audit"])


@router.get("/v1/audit")
def read_audit(
    caller: CallerDep,
    session: SessionDep,
    actor: str | None = None,
    action: str | None = Query(None, description="An action or its prefix, e.g. `key.`."),
    target: str | None = None,
    start: str | None = Query(None, alias="from", description="ISO 8601 or Unix seconds."),
    end: str | None = Query(None, alias="to", description="ISO 8601 or Unix seconds."),
    before: int | None = Query(None, ge=1, le=MAX_ID, description="Entries older than this id."),
    limit: int = Query(100, ge=1, le=audit.MAX_LIST),
) -> dict[str, Any]:
    if not caller.is_admin:
        raise ForbiddenError("only an administrator may read the audit log")
    found = audit.entries(
        session,
        actor=actor,
        action=action,
        target=target,
        since=parse_time(start, "from"),
        until=parse_time(end, "to"),
        before_id=before,
        limit=limit,
    )
    last = found[-1].id if len(found) == limit else None
    return {"entries": [entry_public(e) for e in found], "next_before": last}
