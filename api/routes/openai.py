"""OpenAI's model list and model object, and the inference routes as the OpenAPI document
describes them: their requests are served by the inference core before FastAPI sees them
(`api/inference/asgi.py`, `api/lane/front.py`), so the routes declared here only document
them (`doc_routes`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CallerDep, StateDep, require
from api.errors import ERROR_RESPONSES
from api.inference import admission
from api.inference.schemas import doc_routes
from forwarder.paths import BY_MODEL
from forwarder.table import Target

router = APIRouter(tags=["inference"], dependencies=[require("inference")])
doc_routes(router, ERROR_RESPONSES)


@router.get("/v1/models")
@router.get("/v2/models")  # OpenAI's SDK with its base URL at /v2, where the v2 routes are
async def read_models(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    targets = [
        t for t in state.forwarder.table.by_name.values() if caller.may_infer(t.owner, t.public)
    ]
    return {"object": "list", "data": [model_public(t) for t in targets]}


@router.get("/v1/models/{model}")
@router.get("/v2/models/{model}")
async def read_model(model: str, state: StateDep, caller: CallerDep) -> dict[str, Any]:
    """OpenAI's model object, for an endpoint the caller may send inference; 404 in OpenAI's
    envelope otherwise (the same rule and message as an inference request naming it)."""
    return model_public(await admission.find_endpoint(state, caller, BY_MODEL, model))


def model_public(target: Target) -> dict[str, Any]:
    return {
        "id": target.name,
        "object": "model",
        "created": int(target.created_at),
        "owned_by": target.owner,
    }
