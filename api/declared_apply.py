"""Makes an install match a declared configuration (`POST /v1/config/apply`, which
`appliance apply -f FILE` calls): creates what the document names and the install lacks,
updates what differs, and with `prune` deletes endpoints and revokes keys it does not name.
Applying the same document twice changes nothing: an endpoint whose spec already matches is
left alone (no new generation, no event, no audit entry).

Every change goes through the same functions as the endpoint and key routes (validation,
tenancy, audit, builder nudges). The whole document is checked before the first change, so a
bad entry changes nothing; a conflict met while applying (an endpoint mid-update) stops there,
and applying again finishes the job.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from sqlmodel import Session

from api import endpoint_changes, endpoint_specs
from api.declared import LIMITS, active_keys, managed_endpoints
from api.deps import AppState
from api.routes import api_keys
from api.routes.llm_endpoints import check_not_busy, commit_update, create_endpoint, delete_endpoint
from api.schemas import CreateLLMEndpointRequest
from appliance import queries
from appliance.errors import ConflictError, ForbiddenError, InvalidSpecError, NotFoundError
from appliance.keys import Caller
from appliance.models import ApiKey, Endpoint

MAX_ENTRIES = 1000


def _stamp(value: Any) -> Any:
    """ISO 8601 (as `appliance export` writes it) or Unix seconds, to Unix seconds."""
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value  # pydantic then says it is not a number
        return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return value


class KeyLimitsDeclared(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=0)
    max_concurrent_requests: int | None = Field(None, ge=0)
    max_queued_tasks: int | None = Field(None, ge=0)
    max_tokens_per_request: int | None = Field(None, ge=0)


class KeyDeclared(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=api_keys.NAME)
    team: str = Field(pattern=api_keys.NAME)
    user: str = Field(pattern=api_keys.NAME)
    scopes: list[str] = Field(default_factory=lambda: ["inference", "manage"])
    admin: bool = False
    expires_at: Annotated[float | None, BeforeValidator(_stamp)] = Field(
        None, description="ISO 8601 or Unix seconds."
    )
    limits: KeyLimitsDeclared = Field(default_factory=KeyLimitsDeclared)


class Document(BaseModel):
    """What `appliance export` writes; sections left out are left alone."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    endpoints: list[dict[str, Any]] | None = Field(None, max_length=MAX_ENTRIES)
    keys: list[KeyDeclared] | None = Field(None, max_length=MAX_ENTRIES)


@dataclass
class Report:
    dry_run: bool
    endpoints: dict[str, list[str]] = field(
        default_factory=lambda: {"created": [], "updated": [], "unchanged": [], "deleted": []}
    )
    keys: dict[str, list[Any]] = field(
        default_factory=lambda: {"created": [], "updated": [], "unchanged": [], "revoked": []}
    )
    changes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _EndpointPlan:
    body: CreateLLMEndpointRequest
    team: str | None
    desired: Endpoint
    existing: Endpoint | None


def _parse_endpoint(i: int, entry: dict[str, Any], caller: Caller, state: AppState) -> Any:
    fields = dict(entry)
    team = fields.pop("team", None)
    where = f"endpoints[{i}]"
    if team is not None and not isinstance(team, str):
        raise InvalidSpecError(f"{where}.team must be a team name", field=f"{where}.team")
    if team not in (None, caller.team) and not caller.is_admin:
        raise ForbiddenError(f"{where}: only an administrator may declare another team's endpoints")
    try:
        body = CreateLLMEndpointRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise InvalidSpecError(f"{where}.{path}: {first['msg']}", field=f"{where}.{path}") from None
    try:
        desired = endpoint_specs.new_endpoint(body, caller, state.settings)
    except InvalidSpecError as exc:
        raise InvalidSpecError(f"{where} ({body.name}): {exc.message}", field=where) from None
    return body, team, desired


def plan_endpoints(
    document: Document, caller: Caller, session: Session, state: AppState
) -> list[_EndpointPlan]:
    plans, seen = [], set()
    for i, entry in enumerate(document.endpoints or []):
        body, team, desired = _parse_endpoint(i, entry, caller, state)
        if body.name in seen:
            raise InvalidSpecError(f"endpoints[{i}]: {body.name!r} is named twice", field="name")
        seen.add(body.name)
        try:
            existing: Endpoint | None = queries.endpoint_by_name(body.name, session=session)
        except NotFoundError:
            existing = None
        if existing is not None:
            if not (caller.is_admin or existing.owner == caller.team):
                raise ConflictError(f"the endpoint name {body.name!r} is another team's")
            if (existing.framework, existing.endpoint_type) != (
                desired.framework,
                desired.endpoint_type,
            ):
                raise InvalidSpecError(
                    f"{body.name}: inference_framework and endpoint_type cannot change; "
                    "delete the endpoint first, or apply with prune after removing it",
                    field=f"endpoints[{i}]",
                )
        desired.owner = team or (existing.owner if existing else caller.team)
        plans.append(_EndpointPlan(body, team, desired, existing))
    return plans


def _replace_spec(endpoint: Endpoint, desired: Endpoint) -> bool:
    """Give the row the desired spec; True when its replicas must roll."""
    rolling = {name: getattr(endpoint, name) for name in endpoint_specs.ROLLING_FIELDS}
    for name in endpoint_changes.SPEC_COLUMNS:
        setattr(endpoint, name, getattr(desired, name))
    endpoint.desired_replicas = max(
        endpoint.min_replicas, min(endpoint.desired_replicas, endpoint.max_replicas)
    )
    return any(getattr(endpoint, name) != value for name, value in rolling.items())


def apply_endpoints(
    plans: list[_EndpointPlan],
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    prune: bool,
    report: Report,
    address: str | None,
) -> None:
    named = {p.body.name for p in plans}
    doomed = [e for e in managed_endpoints(caller, session) if e.name not in named]
    for plan in plans:
        name, existing = plan.body.name, plan.existing
        if existing is None:
            report.endpoints["created"].append(name)
            if not report.dry_run:
                create_endpoint(
                    plan.body, caller, session, state, address=address, owner=plan.desired.owner
                )
            continue
        before = endpoint_changes.spec(existing)
        change = endpoint_changes.changes(before, endpoint_changes.spec(plan.desired))
        if not change:
            report.endpoints["unchanged"].append(name)
            continue
        report.endpoints["updated"].append(name)
        report.changes[name] = endpoint_changes.summary(change)
        if not report.dry_run:
            check_not_busy(existing)
            rolls = _replace_spec(existing, plan.desired)
            commit_update(existing, before, rolls, caller, session, state, address=address)
    if prune:
        for endpoint in doomed:
            report.endpoints["deleted"].append(endpoint.name)
            if not report.dry_run:
                delete_endpoint(endpoint, caller, session, state, address=address)


def _key_request(entry: KeyDeclared) -> api_keys.CreateKeyRequest:
    return api_keys.CreateKeyRequest(
        name=entry.name,
        team=entry.team,
        user=entry.user,
        scopes=entry.scopes,
        admin=entry.admin,
        **entry.limits.model_dump(),
    )


def _differs(row: ApiKey, entry: KeyDeclared) -> bool:
    wanted = _key_request(entry)
    expires = None if row.expires_at is None else int(row.expires_at)
    declared = None if entry.expires_at is None else int(entry.expires_at)
    scopes = set(row.scopes) if not entry.admin else set()
    return (
        row.is_admin != entry.admin
        or (not entry.admin and scopes != set(entry.scopes))
        or expires != declared
        or any(getattr(row, name) != getattr(wanted, name) for name in LIMITS)
    )


def _check_keys(
    entries: list[KeyDeclared], active: dict[tuple[str, str, str], ApiKey], now: float
) -> None:
    """Before any change: each key named once, and none to be made already expired."""
    seen: set[tuple[str, str, str]] = set()
    for i, entry in enumerate(entries):
        who = (entry.team, entry.user, entry.name)
        if who in seen:
            raise InvalidSpecError(f"keys[{i}]: {entry.name!r} is named twice", field="keys")
        seen.add(who)
        late = entry.expires_at is not None and entry.expires_at <= now
        if late and who not in active:
            raise InvalidSpecError(f"keys[{i}]: expires_at is in the past", field="expires_at")


def apply_keys(
    document: Document,
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    prune: bool,
    report: Report,
    address: str | None,
) -> None:
    if document.keys is None:
        return
    if not caller.is_admin:
        raise ForbiddenError("only an administrator may declare keys")
    now = time.time()
    listed = active_keys(session, now)
    active: dict[tuple[str, str, str], ApiKey] = {}
    for one in listed:
        active.setdefault((one.owner, one.user, one.name), one)
    _check_keys(document.keys, active, now)
    matched: set[str] = set()
    for entry in document.keys:
        label = f"{entry.name} ({entry.user} · {entry.team})"
        row = active.get((entry.team, entry.user, entry.name))
        if row is None:
            if not report.dry_run:
                row, text = api_keys.make_key(
                    _key_request(entry),
                    caller,
                    session,
                    state,
                    expires_at=entry.expires_at,
                    address=address,
                )
                report.keys["created"].append({"id": row.id, "label": label, "key": text})
            else:
                report.keys["created"].append({"label": label})
            continue
        matched.add(row.id)
        if not _differs(row, entry):
            report.keys["unchanged"].append(label)
            continue
        report.keys["updated"].append(label)
        if not report.dry_run:
            api_keys.update_key(
                row,
                _key_request(entry),
                caller,
                session,
                expires_at=entry.expires_at,
                address=address,
            )
    if prune:
        for one in listed:
            if one.id in matched or one.id == caller.key_id:  # never the key applying this
                continue
            report.keys["revoked"].append(f"{one.name} ({one.user} · {one.owner})")
            if not report.dry_run:
                api_keys.revoke(one, caller, session, address=address)


def apply(
    document: Document,
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    prune: bool,
    dry_run: bool,
    address: str | None,
) -> Report:
    report = Report(dry_run=dry_run)
    if document.keys is not None and not caller.is_admin:
        raise ForbiddenError("only an administrator may declare keys")
    plans = plan_endpoints(document, caller, session, state)  # all checked before any change
    if document.endpoints is not None:
        apply_endpoints(plans, caller, session, state, prune=prune, report=report, address=address)
    apply_keys(document, caller, session, state, prune=prune, report=report, address=address)
    return report
