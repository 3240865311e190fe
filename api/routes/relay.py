"""How LLM Engine's v1 inference routes reach a replica, shared by `completions.py` and
`tasks_sync.py`: read and check the request, forward it whole or as a stream with keep-alives,
record it once it ends. Each route family says only what differs: the upstream path and body,
and, for streams, how the replica's reply and errors become its events (`StreamEvents`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi import Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from api.callers import visible
from api.deps import AppState
from api.routes.openai import (
    KEEPALIVE,
    SSE_HEADERS,
    BodyTooLargeError,
    close_quietly,
    error_status,
    lookup,
    read_body,
)
from appliance.errors import ApplianceError, NoSuchEndpointError, UpstreamError
from appliance.keys import Caller
from forwarder import llm_engine
from forwarder.proxy import Upstream
from forwarder.table import Target
from forwarder.usage import usage_from_json

Model = TypeVar("Model", bound=BaseModel)
SSE_RESPONSE_HEADERS = {k.decode(): v.decode() for k, v in SSE_HEADERS}


@dataclass(frozen=True)
class UpstreamCall:
    """One request on its way to a replica, with what its metrics need."""

    route: Target
    caller: Caller
    path: str
    body: bytes
    started: float  # perf_counter() when the request arrived


class StreamEvents(Protocol):
    """What a streaming route sends: the replica's reply as its events, errors in band."""

    @property
    def ttft_s(self) -> float | None: ...

    @property
    def usage(self) -> tuple[int, int] | None: ...

    def relay(self, upstream: Upstream) -> AsyncIterator[bytes]:
        """The events for a replica's 200 reply."""
        ...

    def failed(self, status: int, data: bytes) -> bytes:
        """The event for a replica's non-200 reply, `data` its body."""
        ...

    def error(self, status: int, message: str) -> bytes:
        """The event for an error after the stream began."""
        ...


async def find_route(
    state: AppState, caller: Caller, *, name: str | None = None, id: str | None = None
) -> Target:
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


def record(
    state: AppState,
    call: UpstreamCall,
    status: int,
    *,
    ttft_s: float | None = None,
    usage: tuple[int, int] | None = None,
) -> None:
    duration_s = time.perf_counter() - call.started
    state.forwarder.record(
        call.route, call.caller.key_id, status, duration_s=duration_s, ttft_s=ttft_s, usage=usage
    )


async def forward(
    state: AppState,
    call: UpstreamCall,
    *,
    timeout_s: float | None = None,
    count_usage: bool = False,
) -> tuple[int, bytes]:
    """The replica's status and whole body, recorded (with its token usage when
    `count_usage`); an UpstreamError is recorded, then raised."""
    status, usage = 500, None
    try:
        upstream = await state.forwarder.open(
            call.route,
            call.path,
            call.body,
            hold_s=state.settings.activation_timeout_s,
            timeout_s=timeout_s,
        )
        try:
            data = await upstream.read()
        finally:
            upstream.close()
        status = upstream.status
        if count_usage and status == 200:
            usage = usage_from_json(data)
        return status, data
    except UpstreamError as exc:
        status = exc.status_code
        raise
    finally:
        record(state, call, status, usage=usage)


async def stream(state: AppState, call: UpstreamCall, events: StreamEvents) -> Response:
    """A replica's non-200 answer as a real HTTP error when a replica is ready now; otherwise
    an SSE stream of `events`, with keep-alives while it waits for one."""
    opening = await start_stream(state, call.route, call.path, call.body)
    if isinstance(opening, Upstream):
        record(state, call, opening.status)
        return await answer_failed(opening)
    return StreamingResponse(
        relay_events(state, call, opening, events), headers=SSE_RESPONSE_HEADERS
    )


async def relay_events(
    state: AppState,
    call: UpstreamCall,
    opening: AsyncIterator[bytes | Upstream],
    events: StreamEvents,
) -> AsyncIterator[bytes]:
    """The stream's body: the opening's keep-alives, then the replica's reply as `events`
    has it; errors end it in band. Recorded once it ends."""
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
            yield events.failed(status, await opened.read())
            return
        async for out in events.relay(opened):
            yield out
        status = 200
    except ApplianceError as exc:
        status = error_status(exc)
        yield events.error(status, exc.message)
    finally:
        if opened is not None:
            opened.close()
        usage = events.usage if status == 200 else None
        record(state, call, status, ttft_s=events.ttft_s, usage=usage)


async def open_or_keepalive(
    state: AppState, route: Target, path: str, body: bytes
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
    state: AppState, route: Target, path: str, body: bytes
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
