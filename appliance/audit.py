"""The audit log: one function, `record`, that every management action calls (endpoint, key,
sign-in and sign-out, file and batch routes), in the same transaction as the change it
records; the reads behind `GET /v1/audit` and the UI's audit page; and the retention prune the
worker's sweeper runs.

Secrets never reach the log: `scrub` drops every field named like a secret, every env value
(only the variable names are kept) and anything shaped like an API key's text. The table is
append-only (a trigger refuses updates); only the prune deletes: entries past the retention,
and each team's oldest past its cap (APPLIANCE_AUDIT_MAX_ENTRIES_PER_TEAM).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from appliance.caller import Caller
from appliance.db import session_scope
from appliance.models import AuditEntry

NOT_RECORDED = "[not recorded]"
SECRET_FIELDS = frozenset(
    {
        "key",
        "api_key",
        "digest",
        "secret",
        "token",
        "password",
        "authorization",
        "callback_auth",
        "default_callback_auth",
        "hf_token",
    }
)
SECRET_SUFFIXES = ("_secret", "_password", "_token", "_auth")
# What every action's name starts with, as `GET /v1/audit?action=` and the UI's filter take it
KINDS = (
    "endpoint.",
    "key.",
    "session.",
    "file.",
    "batch.",
    "model.",
    "hf-model.",
    "hf_download.",
    "image.",
)
KEY_TEXT = re.compile(r"mea_[0-9a-fA-F]{12}_[A-Za-z0-9\-_]+")
MAX_LIST = 1000  # entries one read returns
DAY_S = 86400


def scrub(value: Any, name: str = "") -> Any:
    """`value` with every secret replaced by NOT_RECORDED; env maps keep their names only."""
    lowered = name.lower()
    if lowered in SECRET_FIELDS or lowered.endswith(SECRET_SUFFIXES):
        return NOT_RECORDED if value is not None else None
    if lowered == "env" and isinstance(value, Mapping):
        return dict.fromkeys(map(str, value), NOT_RECORDED)
    if isinstance(value, Mapping):
        return {str(k): scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, name) for v in value]
    if isinstance(value, str):
        return KEY_TEXT.sub(NOT_RECORDED, value)
    return value


def record(
    session: Session,
    actor: Caller | None,
    action: str,
    target: str,
    change: Mapping[str, Any] | None = None,
    address: str | None = None,
) -> None:
    """Add one entry to the session's transaction: it is stored with the change it records,
    or not at all. `actor` None: nobody signed in (a refused sign-in)."""
    session.add(
        AuditEntry(
            at=time.time(),
            actor=actor.user if actor else "",
            team=actor.team if actor else "",
            actor_key_id=actor.key_id if actor else None,
            action=action,
            target=target,
            change=scrub(dict(change or {})),
            address=address,
        )
    )


def record_now(
    engine: Engine,
    actor: Caller | None,
    action: str,
    target: str,
    change: Mapping[str, Any] | None = None,
    address: str | None = None,
) -> None:
    """`record` in a transaction of its own, for actions that store nothing else (sign-in)."""
    with session_scope(engine) as session:
        record(session, actor, action, target, change, address)


def entries(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: float | None = None,
    until: float | None = None,
    before_id: int | None = None,
    limit: int = 100,
) -> Sequence[AuditEntry]:
    """Newest first; `action` matches a prefix ("key." finds key.create and key.revoke)."""
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc())
    if actor:
        query = query.where(col(AuditEntry.actor) == actor)
    if action:
        query = query.where(col(AuditEntry.action).startswith(action))
    if target:
        query = query.where(col(AuditEntry.target) == target)
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    if until is not None:
        query = query.where(col(AuditEntry.at) < until)
    if before_id is not None:
        query = query.where(col(AuditEntry.id) < before_id)
    return session.exec(query.limit(max(1, min(limit, MAX_LIST)))).all()


def prune(session: Session, now: float, retention_days: int, max_per_team: int = 0) -> int:
    """Delete entries older than the retention, then each team's oldest past `max_per_team`
    (0: no cap); returns how many."""
    cutoff = now - retention_days * DAY_S
    result = session.exec(delete(AuditEntry).where(col(AuditEntry.at) < cutoff))
    return int(result.rowcount or 0) + (_cap_teams(session, max_per_team) if max_per_team else 0)


def _cap_teams(session: Session, max_per_team: int) -> int:
    """Delete each team's oldest entries past the cap: its sign-ins and sign-outs first (a
    key may sign in as often as it likes), then its other actions, its keys' creations,
    changes and revocations last (else a leaked key made itself a key, then uploaded and
    deleted files until its `key.create` was gone), oldest first within each. An
    administrator's entries are neither counted nor deleted (only the retention ends them): a
    team's keys cannot push out what an administrator did."""
    over = session.connection().execute(
        text(
            "SELECT team, COUNT(*) FROM audit WHERE actor_key_id IS NULL OR actor_key_id "
            "NOT IN (SELECT id FROM api_key WHERE is_admin) GROUP BY team HAVING COUNT(*) > :n"
        ),
        {"n": max_per_team},
    )
    deleted = 0
    for team, count in over.all():
        result = session.connection().execute(
            text(
                "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE team = :team AND "
                "(actor_key_id IS NULL OR actor_key_id NOT IN "
                "(SELECT id FROM api_key WHERE is_admin)) "
                "ORDER BY CASE WHEN action LIKE 'session.%' THEN 0 WHEN action LIKE 'key.%' THEN 2 "
                "ELSE 1 END, id LIMIT :excess)"
            ),
            {"team": team, "excess": count - max_per_team},
        )
        deleted += int(result.rowcount or 0)
    return deleted
