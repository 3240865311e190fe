"""LLM Engine's endpoint routes, by name: `/v1/llm/model-endpoints` create, list, get, update,
delete. Create and update return at once; the builder does the work and reports the status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require
from api.endpoint_service import (
    create_endpoint,
    delete_endpoint,
    describe_llm,
    owned_by_name,
    progress_of,
    team_endpoints,
    update_endpoint,
)
from api.schemas import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteResponse,
    EndpointView,
    OrderBy,
    UpdateLLMEndpointRequest,
)

router = APIRouter(
    prefix="/v1/llm/model-endpoints", tags=["llm-endpoints"], dependencies=[require("manage")]
)


@router.post("", response_model=CreateLLMEndpointResponse)
def create_llm_endpoint(
    body: CreateLLMEndpointRequest,
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> CreateLLMEndpointResponse:
    endpoint = create_endpoint(body, caller, session, state, address=address)
    return CreateLLMEndpointResponse(endpoint_creation_task_id=endpoint.id)


@router.get("")
def read_llm_endpoints(
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    name: str | None = None,
    order_by: OrderBy | None = None,
) -> dict[str, Any]:
    """The caller's team's endpoints: another team's public endpoint takes its inference,
    but its details are that team's."""
    endpoints = team_endpoints(caller, session, name=name, newest=order_by == "newest")
    progress = progress_of(state)
    return {"model_endpoints": [describe_llm(e, session, progress.get(e.id)) for e in endpoints]}


@router.get("/{name}", response_model=EndpointView)
def read_llm_endpoint(
    name: str, caller: CallerDep, session: SessionDep, state: StateDep
) -> dict[str, Any]:
    endpoint = owned_by_name(name, caller, session=session)
    return describe_llm(endpoint, session, progress_of(state).get(endpoint.id))


@router.put("/{name}", response_model=CreateLLMEndpointResponse)
def update_llm_endpoint(
    name: str,
    body: UpdateLLMEndpointRequest,
    caller: CallerDep,
    session: SessionDep,
    state: StateDep,
    address: AddressDep,
) -> CreateLLMEndpointResponse:
    endpoint = owned_by_name(name, caller, session=session)
    update_endpoint(endpoint, body, caller, session, state, address=address)
    return CreateLLMEndpointResponse(endpoint_creation_task_id=endpoint.id)


@router.delete("/{name}", response_model=DeleteResponse)
def delete_llm_endpoint(
    name: str, caller: CallerDep, session: SessionDep, state: StateDep, address: AddressDep
) -> DeleteResponse:
    endpoint = owned_by_name(name, caller, session=session)
    delete_endpoint(endpoint, caller, session, state, address=address)
    return DeleteResponse(deleted=True)
