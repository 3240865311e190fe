"""Endpoint routes by id (`/v1/model-endpoints`): create, list, get, update, delete, restart,
plus each endpoint's events timeline and its replicas' logs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from sqlmodel import Session, col, select

from api import endpoint_views
from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require
from api.routes.llm_endpoints import BUSY, create_endpoint, delete_endpoint, update_endpoint
from api.schemas import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteResponse,
    UpdateLLMEndpointRequest,
)
from appliance import audit, bus, queries
from appliance.db import session_scope
from appliance.errors import NoSuchEndpointError, OperationInProgressError
from appliance.keys import Caller
from appliance.models import Endpoint, EndpointStatus, ReplicaState

router = APIRouter(
    prefix="/v1/model-endpoints", tags=["model-endpoints"], dependencies=[require("manage")]
)
LOG_POLL_S = 0.5


def owned(endpoint_id: str, caller: Caller, *, session: Session) -> Endpoint:
    endpoint = session.get(Endpoint, endpoint_id)
    if endpoint is None or not caller.owns(endpoint.owner):
        raise NoSuchEndpointError(f"no endpoint with id {endpoint_id!r}")
    return endpoint


def describe(endpoint: Endpoint, session: Session) -> dict[str, Any]:
    replicas = queries.replicas_of(endpoint.id, session=session)
    public = endpoint_views.model_endpoint_public(endpoint, replicas)
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


@router.post("", response_model=CreateLLMEndpointResponse)
def create_model_endpoint(
    body: CreateLLMEndpointRequest,
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> CreateLLMEndpointResponse:
    endpoint = create_endpoint(body, caller, session, state, address=address)
    return CreateLLMEndpointResponse(endpoint_creation_task_id=endpoint.id)


@router.get("")
def read_model_endpoints(
    caller: CallerDep,
    session: SessionDep,
    name: str | None = None,
    order_by: str | None = None,
) -> dict[str, Any]:
    query = select(Endpoint)
    query = queries.of_team(query, col(Endpoint.owner), caller)
    if name:
        query = query.where(col(Endpoint.name) == name)
    newest = order_by == "newest"
    query = query.order_by(col(Endpoint.created_at).desc() if newest else col(Endpoint.created_at))
    return {"model_endpoints": [describe(e, session) for e in session.exec(query).all()]}


@router.get("/{endpoint_id}")
def read_model_endpoint(endpoint_id: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    return describe(owned(endpoint_id, caller, session=session), session)


@router.put("/{endpoint_id}", response_model=CreateLLMEndpointResponse)
def update_model_endpoint(
    endpoint_id: str,
    body: UpdateLLMEndpointRequest,
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> CreateLLMEndpointResponse:
    endpoint = owned(endpoint_id, caller, session=session)
    update_endpoint(endpoint, body, caller, session, state, address=address)
    return CreateLLMEndpointResponse(endpoint_creation_task_id=endpoint.id)


@router.delete("/{endpoint_id}", response_model=DeleteResponse)
def delete_model_endpoint(
    endpoint_id: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> DeleteResponse:
    endpoint = owned(endpoint_id, caller, session=session)
    delete_endpoint(endpoint, caller, session, state, address=address)
    return DeleteResponse(deleted=True)


@router.post("/{endpoint_id}/restart")
def restart_model_endpoint(
    endpoint_id: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> dict[str, bool]:
    """A rolling restart: a new generation with the same spec replaces every replica."""
    endpoint = owned(endpoint_id, caller, session=session)
    if endpoint.status in BUSY:
        raise OperationInProgressError(f"endpoint {endpoint.name!r} is {endpoint.status}")
    endpoint.generation += 1
    endpoint.status, endpoint.status_reason = EndpointStatus.UPDATE_PENDING, None
    endpoint.updated_at = time.time()
    session.add(endpoint)
    queries.add_event(
        endpoint.id, "restart", f"restart requested by {caller.user}", session=session
    )
    change = {"name": endpoint.name, "generation": endpoint.generation}
    audit.record(session, caller, "endpoint.restart", endpoint.id, change, address)
    session.commit()
    bus.nudge_builder(state.redis)
    return {"restarted": True}


@router.get("/{endpoint_id}/events")
def read_endpoint_events(
    endpoint_id: str,
    caller: CallerDep,
    session: SessionDep,
    limit: int = Query(200, ge=1, le=1000),
) -> dict[str, Any]:
    owned(endpoint_id, caller, session=session)
    events = queries.list_events(endpoint_id, session=session, limit=limit)
    return {"events": [{"timestamp": e.at, "kind": e.kind, "message": e.message} for e in events]}


@router.get("/{endpoint_id}/logs")
def read_endpoint_logs(
    endpoint_id: str,
    caller: CallerDep,
    state: StateDep,
    tail: int = Query(100, ge=1, le=5000),
    follow: bool = False,
    replica_id: str | None = None,
) -> StreamingResponse:
    """The replicas' output as the builder ships it to Redis; `follow=1` keeps streaming.

    It opens its own short session: a request-scoped one would hold SQLite's write lock for
    as long as the stream runs."""
    with session_scope(state.engine) as session:
        owned(endpoint_id, caller, session=session)
        all_replicas = queries.replicas_of(endpoint_id, session=session)
    replicas = [r for r in all_replicas if replica_id in (None, r.id)]
    if replica_id and not replicas:
        raise NoSuchEndpointError(f"no replica {replica_id!r} in endpoint {endpoint_id!r}")
    lines: list[bytes] = []
    for replica in replicas:
        if replica.log_tail and replica.state == ReplicaState.FAILED:
            lines.append(f"[{replica.id} crashed] {replica.log_tail}\n".encode())
    keys = [bus.LOGS_KEY.format(replica=r.id) for r in replicas]
    return StreamingResponse(
        _log_lines(state, keys, lines, tail, follow), media_type="text/plain; charset=utf-8"
    )


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


async def _log_lines(
    state: StateDep, keys: list[str], first: list[bytes], tail: int, follow: bool
) -> AsyncIterator[bytes]:
    for line in first:
        yield line
    cursors: dict[str, str] = {}
    for key in keys:
        entries: Any = await asyncio.to_thread(state.redis.xrevrange, key, count=tail)
        cursors[key] = _as_bytes(entries[0][0]).decode() if entries else "$"
        for _entry_id, fields in reversed(entries or []):
            yield _as_bytes(fields[b"line"])
    while follow and keys:
        streams: Any = dict(cursors)
        found: Any = await asyncio.to_thread(
            state.redis.xread, streams, block=int(LOG_POLL_S * 1000)
        )
        for key, entries in found or []:
            for entry_id, fields in entries:
                cursors[_as_bytes(key).decode()] = _as_bytes(entry_id).decode()
                yield _as_bytes(fields[b"line"])
