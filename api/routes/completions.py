"""LLM Engine's completion routes: `/v1/llm/completions-sync` and `/v1/llm/completions-stream`
(`?model_endpoint_name=`), in LLM Engine's request and response formats, served by the
replica's OpenAI `/v1/completions`. Errors answer `{"detail": ...}` as its client expects;
errors after a stream began are sent in band, and v1 streams never carry `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.deps import AdmittedDep, AppState, StateDep, require
from api.routes.openai import (
    KEEPALIVE,
    SSE_HEADERS,
    BodyTooLargeError,
    close_quietly,
    error_status,
    lookup,
    read_body,
    visible,
)
from appliance.errors import ApplianceError, NoSuchEndpointError, UpstreamError
from appliance.keys import Caller
from forwarder import llm_engine
from forwarder.proxy import Upstream
from forwarder.routing import Route
from forwarder.usage import usage_from_json

router = APIRouter(prefix="/v1/llm", tags=["llm-completions"], dependencies=[require("inference")])
Model = TypeVar("Model", bound=BaseModel)


class CompletionV1Request(BaseModel):
    """CompletionSyncV1Request and CompletionStreamV1Request (identical fields)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    max_new_tokens: int = Field(gt=0)
    temperature: float = Field(ge=0.0, le=1.0)
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = Field(None, ge=0.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    include_stop_str_in_output: bool | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    skip_special_tokens: bool | None = True


async def find_route(
    state: AppState, caller: Caller, *, name: str | None = None, id: str | None = None
) -> Route:
    route = visible(await lookup(state, name=name, id=id), caller)
    if route is None:
        raise NoSuchEndpointError(f"no endpoint {name or id}")
    return route


async def read_model(request: Request, state: AppState, model: type[Model]) -> Model:
    """The body as `model`; 413 over the limit, 422 `{"detail": [...]}` when invalid."""
    try:
        body = await read_body(request.scope, request.receive, state.settings.max_body_bytes)
    except BodyTooLargeError as exc:
        raise HTTPException(413, exc.message) from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def detail_error(exc: ApplianceError) -> Response:
    """A domain error raised after the route began, answered like the one handler would."""
    status = exc.status_code if isinstance(exc, UpstreamError) else 503
    headers = {"Retry-After": str(getattr(exc, "retry_after_s", 5))} if status == 503 else None
    return JSONResponse({"detail": exc.message}, status_code=status, headers=headers)


async def open_or_keepalive(
    state: AppState, route: Route, path: str, body: bytes
) -> AsyncIterator[bytes | Upstream]:
    """Keep-alive comments while the request waits for a replica, then the opened Upstream;
    raises the error that ended the wait. Dropping the generator cancels the wait."""
    fwd = state.forwarder
    opening = asyncio.ensure_future(
        fwd.open(route, path, body, hold_s=state.settings.activation_timeout_s)
    )
    try:
        every_s = state.settings.stream_keepalive_s
        while not (await asyncio.wait({opening}, timeout=every_s))[0]:
            yield KEEPALIVE
    except BaseException:
        opening.cancel()
        opening.add_done_callback(close_quietly)
        raise
    yield opening.result()


async def opened_now(upstream: Upstream) -> AsyncIterator[bytes | Upstream]:
    yield upstream


async def start_stream(
    state: AppState, route: Route, path: str, body: bytes
) -> AsyncIterator[bytes | Upstream] | Upstream:
    """Opens upstream now when a replica is ready, so errors stay real HTTP errors (as LLM
    Engine's forwarder does): a non-200 Upstream is returned for the caller to answer with.
    Otherwise the stream starts at once and waits with keep-alives."""
    fwd = state.forwarder
    if not fwd.ready_now(route):
        return open_or_keepalive(state, route, path, body)
    upstream = await fwd.open(route, path, body, hold_s=state.settings.activation_timeout_s)
    return opened_now(upstream) if upstream.status == 200 else upstream


async def answer_failed(upstream: Upstream) -> Response:
    try:
        data = await upstream.read()
    finally:
        upstream.close()
    return JSONResponse({"detail": llm_engine.parse_result(data)}, status_code=upstream.status)


@router.post("/completions-sync")
async def create_completion_sync(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_name: str = Query()
) -> Response:
    started = time.perf_counter()
    req = await read_model(request, state, CompletionV1Request)
    fwd = state.forwarder
    route = await find_route(state, caller, name=model_endpoint_name)
    body = llm_engine.completion_body(req.model_dump(), route.name, stream=False)
    status, usage = 500, None
    try:
        upstream = await fwd.open(
            route, "/v1/completions", body, hold_s=state.settings.activation_timeout_s
        )
        try:
            data = await upstream.read()
        finally:
            upstream.close()
        status = upstream.status
        if status != 200:
            return JSONResponse({"detail": llm_engine.parse_result(data)}, status_code=status)
        reply = json.loads(data)
        usage = usage_from_json(data)
        return JSONResponse(llm_engine.sync_response(reply, uuid.uuid4().hex))
    except UpstreamError as exc:
        status = exc.status_code
        return detail_error(exc)
    finally:
        fwd.record(
            route, caller.key_id, status, duration_s=time.perf_counter() - started, usage=usage
        )


@router.post("/completions-stream")
async def create_completion_stream(
    request: Request, state: StateDep, caller: AdmittedDep, model_endpoint_name: str = Query()
) -> Response:
    started = time.perf_counter()
    req = await read_model(request, state, CompletionV1Request)
    fwd = state.forwarder
    route = await find_route(state, caller, name=model_endpoint_name)
    body = llm_engine.completion_body(req.model_dump(), route.name, stream=True)
    request_id = uuid.uuid4().hex
    opening = await start_stream(state, route, "/v1/completions", body)
    if isinstance(opening, Upstream):
        fwd.record(route, caller.key_id, opening.status, duration_s=time.perf_counter() - started)
        return await answer_failed(opening)

    async def events() -> AsyncIterator[bytes]:
        status, ttft, opened = 500, None, None
        translator = llm_engine.StreamTranslator(request_id)
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
                yield llm_engine.error_event(request_id, status, data.decode("utf-8", "replace"))
                return
            async for chunk in opened.chunks():
                ttft = ttft or time.perf_counter() - started
                out = translator.feed(chunk)
                if out:
                    yield out
            tail = translator.close()
            if tail:
                yield tail
            status = 200
        except ApplianceError as exc:
            status = error_status(exc)
            yield llm_engine.error_event(request_id, status, exc.message)
        finally:
            if opened is not None:
                opened.close()
            usage = None
            if status == 200 and translator.prompt_tokens is not None:
                usage = (int(translator.prompt_tokens), translator.completion_tokens)
            fwd.record(
                route,
                caller.key_id,
                status,
                duration_s=time.perf_counter() - started,
                ttft_s=ttft,
                usage=usage,
            )

    return StreamingResponse(
        events(), headers=dict((k.decode(), v.decode()) for k, v in SSE_HEADERS)
    )
