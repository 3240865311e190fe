"""Endpoint routes by id (`/v1/model-endpoints`): create, list, get, update, delete, restart,
plus each endpoint's events timeline and its replicas' logs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api import endpoint_logs, endpoint_service
from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require
from api.endpoint_service import create_endpoint, delete_endpoint, describe, owned, update_endpoint
from api.schemas import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteResponse,
    EndpointView,
    OrderBy,
    UpdateLLMEndpointRequest,
)
from appliance import queries

router = APIRouter(
    prefix="/v1/model-endpoints", tags=["model-endpoints"], dependencies=[require("manage")]
)


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
    state: StateDep,
    name: str | None = None,
    order_by: OrderBy | None = None,
) -> dict[str, Any]:
    listed = endpoint_service.team_endpoints(
        caller, session, name=name, newest=order_by == "newest"
    )
    progress = endpoint_service.progress_of(state)
    return {"model_endpoints": [describe(e, session, progress.get(e.id)) for e in listed]}


@router.get("/{endpoint_id}", response_model=EndpointView)
def read_model_endpoint(
    endpoint_id: str, caller: CallerDep, session: SessionDep, state: StateDep
) -> dict[str, Any]:
    """LLM Engine's endpoint with the appliance's fields; `progress` (`EndpointProgress`) says
    how far an image pull or a download its replicas wait on has come, null when none."""
    endpoint = owned(endpoint_id, caller, session=session)
    return describe(endpoint, session, endpoint_service.progress_of(state).get(endpoint.id))


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
    endpoint_service.restart_endpoint(endpoint, caller, session, state, address=address)
    return {"restarted": True}


@router.get("/{endpoint_id}/events")
def read_endpoint_events(
    endpoint_id: str,
    caller: CallerDep,
    session: SessionDep,
    limit: int = Query(200, ge=1, le=queries.EVENTS_KEPT_PER_ENDPOINT),
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
    """The replicas' output as the builder ships it to Redis; `follow=1` keeps streaming."""
    lines = endpoint_logs.lines(endpoint_id, caller, state, tail, follow, replica_id)
    return StreamingResponse(lines, media_type=endpoint_logs.MEDIA_TYPE)
