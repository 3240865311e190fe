"""OpenAI's model list, and the inference routes as the OpenAPI document describes them: their
requests are served by the inference core before FastAPI sees them (`api/inference/asgi.py`,
`api/lane/front.py`), so the routes declared here only document them (`doc_routes`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from api.deps import CallerDep, StateDep, require
from api.errors import ERROR_RESPONSES
from api.inference.schemas import doc_routes

router = APIRouter(tags=["inference"], dependencies=[require("inference")])
doc_routes(router, ERROR_RESPONSES)


@router.get("/v1/models")
async def read_models(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    targets = [
        t for t in state.forwarder.table.by_name.values() if caller.may_infer(t.owner, t.public)
    ]
    now = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": t.name, "object": "model", "created": now, "owned_by": t.owner} for t in targets
        ],
    }
