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

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError
from sqlmodel import Session

from api import (
    endpoint_changes,
    endpoint_specs,
    key_service,
    model_files,
    server_args,
    team_limits,
)
from api.body import Body
from api.declared import LIMITS, active_keys, key_identity, managed_endpoints
from api.deps import AppState
from api.endpoint_service import (
    check_not_busy,
    commit_update,
    create_endpoint,
    delete_endpoint,
    gpu_names,
)
from api.errors import invalid_field
from api.schemas import CreateLLMEndpointRequest
from api.times import LAST_STAMP, parse_time
from appliance import queries
from appliance.db import session_scope
from appliance.errors import ConflictError, ForbiddenError, InvalidSpecError, NotFoundError
from appliance.keys import Caller
from appliance.models import ApiKey, Endpoint
from appliance.settings import Settings
from builder.specs import spec_hash

MAX_ENTRIES = 1000


def _stamp(value: Any) -> Any:
    """ISO 8601 (as `appliance export` writes it) or Unix seconds, to Unix seconds."""
    return parse_time(value, "expires_at") if isinstance(value, str) else value


class KeyLimitsDeclared(Body):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: key_service.Limit = None
    max_concurrent_requests: key_service.Limit = None
    max_queued_tasks: key_service.Limit = None
    max_tokens_per_request: key_service.Limit = None


class KeyDeclared(Body):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=key_service.NAME)
    team: str = Field(pattern=key_service.NAME)
    user: str = Field(pattern=key_service.NAME)
    scopes: list[str] = Field(default_factory=lambda: ["inference", "manage"])
    admin: bool = False
    expires_at: Annotated[float | None, BeforeValidator(_stamp)] = Field(
        None, ge=0, le=LAST_STAMP, description="ISO 8601 or Unix seconds."
    )
    limits: KeyLimitsDeclared = Field(default_factory=KeyLimitsDeclared)


class Document(Body):
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


def _parse_endpoint(
    i: int, entry: dict[str, Any], caller: Caller, state: AppState, hidden: frozenset[str]
) -> Any:
    fields = dict(entry)
    team = fields.pop("team", None)
    where = f"endpoints[{i}]"
    if team is not None and not isinstance(team, str):
        raise InvalidSpecError(f"{where}.team must be a team name", field=f"{where}.team")
    if team is not None and not caller.owns(team):
        raise ForbiddenError(f"{where}: only an administrator may declare another team's endpoints")
    try:
        body = CreateLLMEndpointRequest.model_validate(fields)
    except ValidationError as exc:
        raise invalid_field(exc, f"{where}.") from None
    try:
        desired = endpoint_specs.new_endpoint(body, caller, state.settings, hidden=hidden)
        server_args.check_gpu_type(body.gpu_type, desired.gpus, gpu_names(state))
    except InvalidSpecError as exc:
        raise InvalidSpecError(f"{where} ({body.name}): {exc.message}", field=where) from None
    return body, team, desired


def plan_endpoints(
    document: Document, caller: Caller, session: Session, state: AppState
) -> list[_EndpointPlan]:
    plans, seen = [], set()
    hidden = model_files.hidden_from(caller, session=session)
    for i, entry in enumerate(document.endpoints or []):
        body, team, desired = _parse_endpoint(i, entry, caller, state, hidden)
        if body.name in seen:
            raise InvalidSpecError(f"endpoints[{i}]: {body.name!r} is named twice", field="name")
        seen.add(body.name)
        try:
            existing: Endpoint | None = queries.endpoint_by_name(body.name, session=session)
        except NotFoundError:
            existing = None
        if existing is not None:
            if not caller.owns(existing.owner):
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
            if "default_callback_auth" not in entry:
                # an export never carries the secret, so it leaves the auth out: applied back,
                # it is kept (an entry clears it with "default_callback_auth": null)
                kept = existing.extra.get("default_callback_auth")
                desired.extra = {**desired.extra, "default_callback_auth": kept}
        desired.owner = team or (existing.owner if existing else caller.team)
        plans.append(_EndpointPlan(body, team, desired, existing))
    return plans


def _check_room(
    plans: list[_EndpointPlan], caller: Caller, session: Session, state: AppState
) -> None:
    """Before any change: the endpoints the document adds fit in each team's limit (creates
    run before a prune's deletes, so those free no room for them)."""
    adding: dict[str, int] = {}
    for plan in plans:
        if plan.existing is None:
            adding[plan.desired.owner] = adding.get(plan.desired.owner, 0) + 1
    for team, count in adding.items():
        team_limits.check_endpoints(team, caller, state.settings, session=session, adding=count)


def _replace_spec(endpoint: Endpoint, desired: Endpoint, settings: Settings) -> bool:
    """Give the row the desired spec; True when its replicas must roll."""
    before = spec_hash(endpoint, settings)
    for name in endpoint_changes.SPEC_COLUMNS:
        setattr(endpoint, name, getattr(desired, name))
    endpoint.desired_replicas = max(
        endpoint.min_replicas, min(endpoint.desired_replicas, endpoint.max_replicas)
    )
    return endpoint_specs.rolls(before, endpoint, settings)


def apply_endpoints(
    plans: list[_EndpointPlan],
    doomed: list[Endpoint],
    caller: Caller,
    state: AppState,
    *,
    report: Report,
    address: str | None,
) -> None:
    """Each change in a transaction of its own, through the endpoint routes' functions."""
    for plan in plans:
        name, existing = plan.body.name, plan.existing
        if existing is None:
            report.endpoints["created"].append(name)
            if not report.dry_run:
                with session_scope(state.engine) as session:
                    owner = plan.desired.owner
                    create_endpoint(plan.body, caller, session, state, address=address, owner=owner)
            continue
        change = endpoint_changes.changes(
            endpoint_changes.spec(existing), endpoint_changes.spec(plan.desired)
        )
        if not change:
            report.endpoints["unchanged"].append(name)
            continue
        report.endpoints["updated"].append(name)
        report.changes[name] = endpoint_changes.summary(change)
        if not report.dry_run:
            with session_scope(state.engine) as session:
                row = queries.endpoint_by_id(existing.id, session=session)
                check_not_busy(row)
                before = endpoint_changes.spec(row)
                rolls = _replace_spec(row, plan.desired, state.settings)
                commit_update(row, before, rolls, caller, session, state, address=address)
    for endpoint in doomed:
        report.endpoints["deleted"].append(endpoint.name)
        if not report.dry_run:
            with session_scope(state.engine) as session:
                row = queries.endpoint_by_id(endpoint.id, session=session)
                delete_endpoint(row, caller, session, state, address=address)


def _key_request(entry: KeyDeclared) -> key_service.CreateKeyRequest:
    return key_service.CreateKeyRequest(
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


@dataclass(frozen=True)
class _KeyPlan:
    entries: list[tuple[KeyDeclared, ApiKey | None]]
    revoked: list[ApiKey]


def plan_keys(document: Document, caller: Caller, session: Session, *, prune: bool) -> _KeyPlan:
    """Which declared keys exist (by team, user and name), and which active ones go."""
    if not caller.is_admin:
        raise ForbiddenError("only an administrator may declare keys")
    now = time.time()
    listed = active_keys(session, now)
    active: dict[tuple[str, str, str], ApiKey] = {}
    for row in listed:
        active.setdefault(key_identity(row), row)
    entries = document.keys or []
    _check_keys(entries, active, now)
    pairs = [(e, active.get((e.team, e.user, e.name))) for e in entries]
    named = {(e.team, e.user, e.name) for e in entries}  # every row of a named key stays
    doomed = [r for r in listed if key_identity(r) not in named and r.id != caller.key_id]
    doomed = doomed if prune else []
    return _KeyPlan(pairs, doomed)  # never revokes the key applying this


def apply_keys(
    plan: _KeyPlan, caller: Caller, state: AppState, *, report: Report, address: str | None
) -> None:
    for entry, found in plan.entries:
        label = f"{entry.name} ({entry.user} · {entry.team})"
        if found is not None and not _differs(found, entry):
            report.keys["unchanged"].append(label)
            continue
        if report.dry_run:
            report.keys["created" if found is None else "updated"].append({"label": label})
            continue
        wanted = _key_request(entry)
        with session_scope(state.engine) as session:
            if found is None:
                row, text = key_service.make_key(
                    wanted, caller, session, state, expires_at=entry.expires_at, address=address
                )
                report.keys["created"].append({"id": row.id, "label": label, "key": text})
                continue
            row = session.get(ApiKey, found.id) or found
            key_service.update_key(
                row, wanted, caller, session, expires_at=entry.expires_at, address=address
            )
            report.keys["updated"].append({"id": row.id, "label": label})
    for doomed in plan.revoked:
        report.keys["revoked"].append(f"{doomed.name} ({doomed.user} · {doomed.owner})")
        if not report.dry_run:
            with session_scope(state.engine) as session:
                row = session.get(ApiKey, doomed.id) or doomed
                key_service.revoke(row, caller, session, address=address)


def apply(
    document: Document,
    caller: Caller,
    state: AppState,
    *,
    prune: bool,
    dry_run: bool,
    address: str | None,
) -> Report:
    """Check the whole document, then make each change in a transaction of its own."""
    report = Report(dry_run=dry_run)
    with session_scope(state.engine) as session:
        plans = plan_endpoints(document, caller, session, state)
        _check_room(plans, caller, session, state)
        named = {p.body.name for p in plans}
        doomed = [e for e in managed_endpoints(caller, session) if e.name not in named]
        keys = (
            plan_keys(document, caller, session, prune=prune) if document.keys is not None else None
        )
    if document.endpoints is not None:
        gone = doomed if prune else []
        apply_endpoints(plans, gone, caller, state, report=report, address=address)
    if keys is not None:
        apply_keys(keys, caller, state, report=report, address=address)
    return report
