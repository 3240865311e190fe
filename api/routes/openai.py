"""OpenAI-compatible inference routes: `model` names the endpoint; bodies and streams pass
through to a replica byte for byte."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from api.deps import CallerDep, StateDep, require
from appliance.errors import InvalidSpecError, NoSuchEndpointError
from appliance.keys import Caller
from forwarder.routing import Route

router = APIRouter(tags=["openai"], dependencies=[require("inference")])


def route_for(model: Any, caller: Caller, state: StateDep) -> Route:
    if not isinstance(model, str) or not model:
        raise InvalidSpecError("`model` must name an endpoint", field="model")
    route = state.forwarder.table.by_name.get(model)
    if route is None or not (caller.is_admin or route.owner == caller.team or route.public):
        raise NoSuchEndpointError(f"The model `{model}` does not exist.", field="model")
    return route


async def read_json(request: Request) -> tuple[bytes, dict[str, Any]]:
    body = await request.body()
    try:
        payload = json.loads(body)
    except ValueError:
        raise InvalidSpecError("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidSpecError("the request body must be a JSON object")
    return body, payload


async def proxy(request: Request, state: StateDep, caller: Caller, path: str) -> Response:
    body, payload = await read_json(request)
    route = route_for(payload.get("model"), caller, state)
    reply = await state.forwarder.forward(
        route,
        path,
        body,
        request.headers.get("content-type", "application/json"),
        hold_s=state.settings.activation_timeout_s,
    )
    return StreamingResponse(reply.body, status_code=reply.status, headers=reply.headers)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request, state: StateDep, caller: CallerDep) -> Response:
    return await proxy(request, state, caller, "/v1/chat/completions")


@router.post("/v1/completions")
async def create_completion(request: Request, state: StateDep, caller: CallerDep) -> Response:
    return await proxy(request, state, caller, "/v1/completions")


@router.post("/v1/embeddings")
async def create_embedding(request: Request, state: StateDep, caller: CallerDep) -> Response:
    return await proxy(request, state, caller, "/v1/embeddings")


@router.get("/v1/models")
async def read_models(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    routes = [
        r
        for r in state.forwarder.table.by_name.values()
        if caller.is_admin or r.owner == caller.team or r.public
    ]
    now = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": r.name, "object": "model", "created": now, "owned_by": r.owner} for r in routes
        ],
    }
