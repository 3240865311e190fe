"""LLM Engine's endpoint routes, by name: `/v1/llm/model-endpoints` create, list, get, update,
delete. Create and update return at once; the builder does the work and reports the status."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlmodel import col, select

from api.deps import AddressDep, CallerDep, SessionDep, StateDep, require
from api.endpoint_service import (
    create_endpoint,
    delete_endpoint,
    describe_llm,
    owned_by_name,
    update_endpoint,
)
from api.schemas import (
    CreateLLMEndpointRequest,
    CreateLLMEndpointResponse,
    DeleteResponse,
    UpdateLLMEndpointRequest,
)
from appliance import queries
from appliance.errors import NoSuchEndpointError
from appliance.models import Endpoint

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
    caller: CallerDep, session: SessionDep, name: str | None = None, order_by: str | None = None
) -> dict[str, Any]:
    query = select(Endpoint)
    if name:
        query = query.where(Endpoint.name == name)
    newest = order_by == "newest"
    query = query.order_by(col(Endpoint.created_at).desc() if newest else col(Endpoint.created_at))
    endpoints = [
        e for e in session.exec(query).all() if caller.may_infer(e.owner, e.public_inference)
    ]
    return {"model_endpoints": [describe_llm(e, session) for e in endpoints]}


@router.get("/{name}")
def read_llm_endpoint(name: str, caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    endpoint = queries.endpoint_by_name(name, session=session)
    if not caller.may_infer(endpoint.owner, endpoint.public_inference):
        raise NoSuchEndpointError(f"no endpoint named {name!r}")
    return describe_llm(endpoint, session)


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
