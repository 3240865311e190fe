"""What the endpoint routes (by name and by id), the UI's forms and pages and the declared
configuration do to endpoints, written once: find one the caller owns, describe it, list a
team's, create, update, restart and delete them (validated, evented, audited, the builder and
the routing tables nudged). Route modules parse HTTP and call these; they never call each
other."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from sqlmodel import Session, col, select

from api import (
    endpoint_changes,
    endpoint_specs,
    endpoint_updates,
    endpoint_views,
    model_files,
    server_args,
    team_limits,
)
from api.deps import AppState
from api.schemas import CreateLLMEndpointRequest, EndpointProgress, UpdateLLMEndpointRequest
from appliance import audit, bus, queries
from appliance.errors import ConflictError, NoSuchEndpointError, OperationInProgressError
from appliance.keys import Caller
from appliance.models import Endpoint, EndpointStatus
from builder.reconcile import waits_for_room

BUSY = (
    EndpointStatus.UPDATE_PENDING,
    EndpointStatus.UPDATE_IN_PROGRESS,
    EndpointStatus.DELETE_IN_PROGRESS,
)


def owned_by_name(name: str, caller: Caller, *, session: Session) -> Endpoint:
    endpoint = queries.endpoint_by_name(name, session=session)
    if not caller.owns(endpoint.owner):
        raise NoSuchEndpointError(f"no endpoint named {name!r}")
    return endpoint


def owned(endpoint_id: str, caller: Caller, *, session: Session) -> Endpoint:
    endpoint = session.get(Endpoint, endpoint_id)
    if endpoint is None or not caller.owns(endpoint.owner):
        raise NoSuchEndpointError(f"no endpoint with id {endpoint_id!r}")
    return endpoint


def progress_of(state: AppState) -> dict[str, dict[str, Any]]:
    """What each endpoint waits on (an image pull, a download), as the builder last published
    it; empty when Redis cannot say (the GET still answers, without progress)."""
    try:
        raw = state.redis.hgetall(bus.PROGRESS_KEY)
    except redis.RedisError:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        try:
            found[name] = EndpointProgress.model_validate_json(value).model_dump()
        except ValueError:
            continue  # a builder of another version: no progress rather than a 500
    return found


def describe(
    endpoint: Endpoint, session: Session, progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The appliance's GET (`/v1/model-endpoints/{id}`, the UI): LLM Engine's endpoint, its
    server settings as a create request names them (`server_settings`, as `/v1/config`
    exports them) and its replicas."""
    replicas = queries.replicas_of(endpoint.id, session=session)
    queued = queries.queued_tasks(endpoint.id, session=session)
    public = endpoint_views.model_endpoint_public(endpoint, replicas, progress, queued)
    public["server_settings"] = server_args.request_fields(endpoint.args)
    public["replicas"] = [
        {
            "id": r.id,
            "generation": r.generation,
            "state": r.state,
            "gpus": r.gpus,
            "container_name": r.container_name,
            "restarts": r.restarts,
            "last_error": r.last_error,
        }
        for r in replicas
    ]
    return public


def gpu_names(state: AppState) -> list[str] | None:
    """The names of the box's GPUs as the builder last reported them (None: not yet)."""
    raw = state.redis.get(bus.GPUS_KEY)
    if not raw:
        return None
    return [str(gpu.get("name", "")) for gpu in json.loads(raw).get("gpus", [])]


def describe_llm(
    endpoint: Endpoint, session: Session, progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    return endpoint_views.llm_endpoint_public(
        endpoint,
        queries.replicas_of(endpoint.id, session=session),
        progress,
        queries.queued_tasks(endpoint.id, session=session),
    )


def create_endpoint(
    body: CreateLLMEndpointRequest,
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    address: str | None,
    owner: str | None = None,
) -> Endpoint:
    """Shared by the by-name and by-id routes, the UI and the declared configuration:
    validate, store UPDATE_PENDING, audit, nudge. `owner`: another team's (admins only)."""
    hidden = model_files.hidden_from(caller, session=session)
    endpoint = endpoint_specs.new_endpoint(body, caller, state.settings, hidden=hidden)
    # the count came as num_shards when a body sent it and no gpus (LLM Engine's client)
    sent = body.gpus is None and "num_shards" in body.model_fields_set
    sent_as = "num_shards" if sent else "gpus"
    server_args.check_gpu_type(body.gpu_type, endpoint.gpus, gpu_names(state), sent_as)
    if owner is not None:
        endpoint.owner = owner
    if session.exec(select(Endpoint).where(Endpoint.name == body.name)).first():
        raise ConflictError(f"an endpoint named {body.name!r} already exists", field="name")
    team_limits.check_endpoints(endpoint.owner, caller, state.settings, session=session)
    session.add(endpoint)
    queries.add_event(endpoint.id, "created", f"created by {caller.user}", session=session)
    spec = body.model_dump(exclude_none=True, exclude_defaults=True)
    audit.record(
        session,
        caller,
        "endpoint.create",
        endpoint.id,
        {"name": endpoint.name, "team": endpoint.owner, "spec": spec},
        address,
    )
    session.commit()
    bus.nudge_builder(state.redis)
    bus.announce_routes(state.redis)  # the api's routing table learns of it at once
    return endpoint


def check_not_busy(endpoint: Endpoint) -> None:
    """409 while a change is in progress (a rollout waiting for GPUs or memory may be changed:
    its status_reason says to). One being deleted becomes neither READY nor UPDATE_FAILED."""
    if endpoint.status == EndpointStatus.DELETE_IN_PROGRESS:
        raise OperationInProgressError(
            f"endpoint {endpoint.name!r} is being deleted; it can no longer be changed or "
            "restarted (create it again once it is gone)"
        )
    if endpoint.status in BUSY and not waits_for_room(endpoint.status_reason):
        raise OperationInProgressError(
            f"endpoint {endpoint.name!r} is {endpoint.status}; wait until it is READY or "
            "UPDATE_FAILED"
        )


def update_endpoint(
    endpoint: Endpoint,
    body: UpdateLLMEndpointRequest,
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    address: str | None,
) -> bool:
    """Shared by the by-name and by-id routes and the UI; False when nothing changed."""
    check_not_busy(endpoint)
    before = endpoint_changes.spec(endpoint)
    hidden = model_files.hidden_from(caller, session=session)
    rolls = endpoint_updates.apply_update(endpoint, body, caller, state.settings, hidden=hidden)
    server_args.check_gpu_type(body.gpu_type, endpoint.gpus, gpu_names(state))
    return commit_update(endpoint, before, rolls, caller, session, state, address=address)


def commit_update(
    endpoint: Endpoint,
    before: dict[str, Any],
    rolls: bool,
    caller: Caller,
    session: Session,
    state: AppState,
    *,
    address: str | None,
) -> bool:
    """Store an edit made to the row in place: a new generation when replicas must roll (or
    to retry a failed one), one event saying what changed, one audit entry, the nudges.
    An edit that changed nothing stores nothing, and says so by returning False."""
    change = endpoint_changes.changes(before, endpoint_changes.spec(endpoint))
    retry = endpoint.status == EndpointStatus.UPDATE_FAILED
    if not (change or rolls or retry):
        return False
    endpoint.updated_at = time.time()
    if rolls or retry:
        endpoint.rolled_at = endpoint.updated_at  # wakes it from zero; other edits do not
        endpoint.generation += 1
        endpoint.status, endpoint.status_reason = EndpointStatus.UPDATE_PENDING, None
    session.add(endpoint)
    said = endpoint_changes.summary(change) or "no spec change"
    if rolls or retry:
        said += f"; rolling to generation {endpoint.generation}"
    queries.add_event(endpoint.id, "updated", f"updated by {caller.user}: {said}", session=session)
    record = {"name": endpoint.name, "changes": change, "generation": endpoint.generation}
    audit.record(session, caller, "endpoint.update", endpoint.id, record, address)
    session.commit()
    bus.nudge_builder(state.redis)
    bus.announce_routes(state.redis)  # the api's routing table learns of it at once
    return True


def delete_endpoint(
    endpoint: Endpoint, caller: Caller, session: Session, state: AppState, *, address: str | None
) -> None:
    if endpoint.status != EndpointStatus.DELETE_IN_PROGRESS:
        endpoint.status, endpoint.status_reason = EndpointStatus.DELETE_IN_PROGRESS, None
        endpoint.updated_at = time.time()
        session.add(endpoint)
        queries.add_event(endpoint.id, "deleting", f"deleted by {caller.user}", session=session)
        change = {"name": endpoint.name, "team": endpoint.owner}
        audit.record(session, caller, "endpoint.delete", endpoint.id, change, address)
        session.commit()
    bus.nudge_builder(state.redis)
    bus.announce_routes(state.redis)  # the api's routing table learns of it at once


def team_endpoints(
    caller: Caller, session: Session, *, name: str | None, newest: bool
) -> list[Endpoint]:
    """The caller's team's endpoints (every team's for an admin), oldest first unless `newest`."""
    query = queries.of_team(select(Endpoint), col(Endpoint.owner), caller)
    if name:
        query = query.where(col(Endpoint.name) == name)
    query = query.order_by(col(Endpoint.created_at).desc() if newest else col(Endpoint.created_at))
    return list(session.exec(query).all())


def restart_endpoint(
    endpoint: Endpoint, caller: Caller, session: Session, state: AppState, *, address: str | None
) -> None:
    """A rolling restart: a new generation with the same spec replaces every replica."""
    check_not_busy(endpoint)
    endpoint.generation += 1
    endpoint.status, endpoint.status_reason = EndpointStatus.UPDATE_PENDING, None
    endpoint.updated_at = endpoint.rolled_at = time.time()
    session.add(endpoint)
    queries.add_event(
        endpoint.id, "restart", f"restart requested by {caller.user}", session=session
    )
    change = {"name": endpoint.name, "generation": endpoint.generation}
    audit.record(session, caller, "endpoint.restart", endpoint.id, change, address)
    session.commit()
    bus.nudge_builder(state.redis)
