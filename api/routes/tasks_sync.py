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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdmittedDep, StateDep, require
from api.routes.completions import answer_failed, find_route, read_model, start_stream
from api.routes.openai import SSE_HEADERS, error_status
from appliance.errors import ApplianceError, UpstreamError
from forwarder import llm_engine
from forwarder.routing import Route

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


def task_request(
    route: Route, req: SyncEndpointPredictV1Request, stream: bool
) -> tuple[str, bytes]:
    if req.args is None:
        raise HTTPException(400, "this endpoint takes `args` (url and cloudpickle are not served)")
    args = req.args
    path = llm_engine.task_path(route.framework, route.predict_route, args)
    if stream and isinstance(args, dict) and path.startswith("/v1/"):
        args = {**args, "stream": True}
    return path, json.dumps(args).encode()


@router.post("/v1/sync-tasks")
async def create_sync_task(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_id: str = Query()
) -> Response:
    started = time.perf_counter()
    req = await read_model(request, state, SyncEndpointPredictV1Request)
    fwd = state.forwarder
    route = await find_route(state, caller, id=model_endpoint_id)
    path, body = task_request(route, req, stream=False)
    status = 500
    try:
        upstream = await fwd.open(
            route,
            path,
            body,
            hold_s=state.settings.activation_timeout_s,
            timeout_s=req.timeout_seconds,
        )
        try:
            data = await upstream.read()
        finally:
            upstream.close()
        status = upstream.status
    except UpstreamError as exc:
        status = exc.status_code
        if status == 504:  # LLM Engine answers a sync task's timeout with 408
            raise HTTPException(408, exc.message) from None
        raise
    finally:
        fwd.record(route, caller.key_id, status, duration_s=time.perf_counter() - started)
    return JSONResponse(llm_engine.sync_task_response(status, data))


@router.post("/v1/streaming-tasks")
async def create_streaming_task(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_id: str = Query()
) -> Response:
    started = time.perf_counter()
    req = await read_model(request, state, SyncEndpointPredictV1Request)
    fwd = state.forwarder
    route = await find_route(state, caller, id=model_endpoint_id)
    path, body = task_request(route, req, stream=True)
    opening = await start_stream(state, route, path, body)
    if not isinstance(opening, AsyncIterator):
        fwd.record(route, caller.key_id, opening.status, duration_s=time.perf_counter() - started)
        return await answer_failed(opening)

    async def events() -> AsyncIterator[bytes]:
        status, opened = 500, None
        try:
            async for item in opening:
                if isinstance(item, bytes):
                    yield item
                else:
                    opened = item
            assert opened is not None
            if opened.status != 200:
                status = opened.status
                data = await opened.read()
                yield llm_engine.task_event(llm_engine.parse_result(data), status)
                return
            if "text/event-stream" in opened.response.headers.get("content-type", ""):
                async for out in llm_engine.wrap_task_stream(opened.chunks()):
                    yield out
            else:  # the replica answered in one piece: one event
                yield llm_engine.task_event(llm_engine.parse_result(await opened.read()))
            status = 200
        except ApplianceError as exc:
            status = error_status(exc)
            yield llm_engine.task_event({"detail": exc.message}, status)
        finally:
            if opened is not None:
                opened.close()
            fwd.record(route, caller.key_id, status, duration_s=time.perf_counter() - started)

    return StreamingResponse(events(), headers={k.decode(): v.decode() for k, v in SSE_HEADERS})
