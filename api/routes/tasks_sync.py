"""LLM Engine's generic inference routes by endpoint id: `/v1/sync-tasks` and
`/v1/streaming-tasks` (`?model_endpoint_id=`). The body's `args` go to the replica; results
come back wrapped as LLM Engine's forwarder wraps them (reference/llm-engine.md §2-3).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdmittedDep, AppState, StateDep, require
from api.routes import relay
from appliance.errors import UpstreamError
from appliance.keys import Caller
from forwarder import llm_engine
from forwarder.proxy import Upstream

router = APIRouter(tags=["tasks"], dependencies=[require("inference")])


class SyncEndpointPredictV1Request(BaseModel):
    """EndpointPredictV1Request plus the sync variant's `timeout_seconds` and `num_retries`."""

    model_config = ConfigDict(extra="ignore")

    url: str | None = None
    args: Any = None
    cloudpickle: str | None = None
    callback_url: str | None = None
    callback_auth: dict[str, Any] | None = None
    return_pickled: bool = False
    destination_path: str | None = None
    timeout_seconds: float | None = Field(None, gt=0)
    num_retries: int | None = Field(None, ge=0)


class TaskEvents:
    """LLM Engine's streaming-task events: each of the replica's events wrapped, or its whole
    reply as one event when it did not stream."""

    ttft_s = None
    usage = None

    def relay(self, upstream: Upstream) -> AsyncIterator[bytes]:
        if "text/event-stream" in upstream.response.headers.get("content-type", ""):
            return llm_engine.wrap_task_stream(upstream.chunks())
        return self.whole(upstream)

    async def whole(self, upstream: Upstream) -> AsyncIterator[bytes]:
        yield llm_engine.task_event(llm_engine.parse_result(await upstream.read()))

    def failed(self, status: int, data: bytes) -> bytes:
        return llm_engine.task_event(llm_engine.parse_result(data), status)

    def error(self, status: int, message: str) -> bytes:
        return llm_engine.task_event({"detail": message}, status)


async def read_task(
    request: Request, state: AppState, caller: Caller, endpoint_id: str, *, stream: bool
) -> tuple[relay.UpstreamCall, SyncEndpointPredictV1Request]:
    started = time.perf_counter()
    req = await relay.read_model(request, state, SyncEndpointPredictV1Request)
    route = await relay.find_route(state, caller, id=endpoint_id)
    if req.args is None:
        raise HTTPException(400, "this endpoint takes `args` (url and cloudpickle are not served)")
    args = req.args
    path = llm_engine.task_path(route.framework, route.predict_route, args)
    if stream and isinstance(args, dict) and path.startswith("/v1/"):
        args = {**args, "stream": True}
    return relay.UpstreamCall(route, caller, path, json.dumps(args).encode(), started), req


@router.post("/v1/sync-tasks")
async def create_sync_task(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_id: str = Query()
) -> Response:
    call, req = await read_task(request, state, caller, model_endpoint_id, stream=False)
    try:
        status, data = await relay.forward(state, call, timeout_s=req.timeout_seconds)
    except UpstreamError as exc:
        if exc.status_code == 504:  # LLM Engine answers a sync task's timeout with 408
            raise HTTPException(408, exc.message) from None
        raise
    return JSONResponse(llm_engine.sync_task_response(status, data))


@router.post("/v1/streaming-tasks")
async def create_streaming_task(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_id: str = Query()
) -> Response:
    call, _ = await read_task(request, state, caller, model_endpoint_id, stream=True)
    return await relay.stream(state, call, TaskEvents())
