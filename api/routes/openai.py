"""OpenAI-compatible inference routes: `model` names the endpoint; bodies and streams pass
through to a replica byte for byte.

The POST routes are the hot path, so `InferenceRoutes` serves them as pure ASGI in front of
FastAPI (no per-request dependency graph, no response classes): auth through the same cached
key check as every route, OpenAI's error envelope, a body limit, cold-start holds with SSE
keep-alive comments, cancellation of the upstream request when the client goes away, and an
`x-appliance-overhead-ms` header with the time the appliance itself added. `/v1/models` is a
plain FastAPI route. LLM Engine's `/v2/chat/completions` and `/v2/completions` take the same
path (model = endpoint name).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import limits
from api.callers import visible
from api.deps import AppState, CallerDep, StateDep, authenticate, require
from api.errors import error_headers, openai_error, status_of
from api.limits import Release
from appliance.errors import (
    ApplianceError,
    ForbiddenError,
    InvalidSpecError,
    NoSuchEndpointError,
    UpstreamError,
)
from appliance.keys import Caller
from forwarder.proxy import Upstream
from forwarder.refresh import load_table
from forwarder.table import Target
from forwarder.usage import StreamUsage, usage_from_json

router = APIRouter(tags=["openai"], dependencies=[require("inference")])

UPSTREAM_PATHS = {  # our path -> the replica's path
    "/v1/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/v1/embeddings": "/v1/embeddings",
    "/v2/chat/completions": "/v1/chat/completions",
    "/v2/completions": "/v1/completions",
}
WHOLE_BODY_MAX_BYTES = 1024 * 1024  # replies this small with a length are read, then sent once
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
KEEPALIVE = b": keep-alive\n\n"
RELOAD_ON_MISS_S = 0.5
CLIENT_CLOSED = 499  # nginx's code for a client that went away, in metrics only


class BodyTooLargeError(ApplianceError):
    """The request body is over `max_body_bytes`."""


async def lookup(
    state: AppState, *, name: str | None = None, id: str | None = None
) -> Target | None:
    """The endpoint's route; a miss re-reads the table (at most every RELOAD_ON_MISS_S), so an
    endpoint created a moment ago is found before the next periodic refresh."""
    forwarder = state.forwarder
    for attempt in range(2):
        table = forwarder.table
        route = table.by_name.get(name) if name is not None else table.by_id.get(id or "")
        if route is not None or attempt:
            return route
        now = time.monotonic()
        if now - forwarder.loaded_at < RELOAD_ON_MISS_S:
            return None
        forwarder.loaded_at = now
        forwarder.update(await run_in_threadpool(load_table, state.engine))
    return None


async def route_for(model: Any, caller: Caller, state: AppState) -> Target:
    if not isinstance(model, str) or not model:
        raise InvalidSpecError("`model` must name an endpoint", field="model")
    route = visible(await lookup(state, name=model), caller)
    if route is None:
        raise NoSuchEndpointError(f"The model `{model}` does not exist.", field="model")
    return route


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLargeError as soon as it is known to be over `limit`."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLargeError(f"the request body is over the limit of {limit} bytes")
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected")
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLargeError(f"the request body is over the limit of {limit} bytes")
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise InvalidSpecError("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InvalidSpecError("the request body must be a JSON object")
    return payload


def error_status(exc: ApplianceError) -> int:
    """As the one handler maps it, except a bad body: OpenAI answers 400, and 413 over size."""
    if isinstance(exc, BodyTooLargeError):
        return 413
    if type(exc) is InvalidSpecError:
        return 400
    return status_of(exc)


def json_error(exc: ApplianceError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of an error answered before any byte of a reply."""
    status = error_status(exc)
    body = json.dumps(openai_error(status, exc.message, exc.field)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error_headers(exc, status).items()]
    return status, headers, body


async def send_json_error(send: Send, exc: ApplianceError) -> int:
    status, headers, body = json_error(exc)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    return status


def sse_error(exc: ApplianceError) -> bytes:
    """An error after a stream began: OpenAI's envelope as one `data:` event."""
    return b"data: " + json.dumps(openai_error(error_status(exc), exc.message)).encode() + b"\n\n"


class Disconnects:
    """Cancels the request's task when the client disconnects, so the upstream request is
    dropped (and the replica stops generating) instead of running to its end."""

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.happened = False
        self.done = False
        self.waiter = asyncio.ensure_future(receive())
        self.waiter.add_done_callback(self._heard)

    def _heard(self, waiter: asyncio.Future[Message]) -> None:
        if self.done or waiter.cancelled() or waiter.exception() is not None:
            return
        if waiter.result()["type"] == "http.disconnect" and self.task is not None:
            self.happened = True
            self.task.cancel()

    def stop(self) -> None:
        self.done = True
        if not self.waiter.done():
            self.waiter.cancel()


class InferenceRoutes:
    """Pure ASGI middleware serving the inference POST routes; everything else goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            upstream_path = UPSTREAM_PATHS.get(scope["path"])
            if upstream_path is not None:
                state: AppState = scope["app"].state.appliance
                await Exchange(state, scope, receive, send).run(upstream_path)
                return
        await self.app(scope, receive, send)


class Exchange:
    """One inference request from arrival to the last byte of its reply."""

    def __init__(self, state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
        self.state = state
        self.forwarder = state.forwarder
        self.scope = scope
        self.receive = receive
        self.send = send
        self.started_at = time.perf_counter()
        self.key_id = "-"
        self.route: Target | None = None
        self.status = 500
        self.ttft_s: float | None = None
        self.overhead_s: float | None = None
        self.usage: tuple[int, int] | None = None
        self.sse_started = False
        self.release: Release | None = None

    async def run(self, upstream_path: str) -> None:
        try:
            route, body, stream = await self._admit()
        except ApplianceError as exc:
            await self._release()
            await send_json_error(self.send, exc)
            return
        except asyncio.CancelledError:
            await self._release()
            return  # gone before it sent its body
        disconnects = Disconnects(self.receive)
        try:
            await self._serve(route, upstream_path, body, stream)
        except asyncio.CancelledError:
            if not disconnects.happened:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.status = CLIENT_CLOSED
        finally:
            disconnects.stop()
            await self._release()
            self.forwarder.record(
                route,
                self.key_id,
                self.status,
                duration_s=time.perf_counter() - self.started_at,
                overhead_s=self.overhead_s,
                ttft_s=self.ttft_s,
                usage=self.usage,
            )

    async def _release(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            await release()

    async def _admit(self) -> tuple[Target, bytes, bool]:
        caller = await authenticate(Request(self.scope), self.state)
        if not caller.can("inference"):
            raise ForbiddenError("this key lacks the 'inference' scope")
        self.key_id = caller.key_id
        self.release = await self.state.limiter.admit(caller)
        body = await read_body(self.scope, self.receive, self.state.settings.max_body_bytes)
        payload = parse_object(body)
        limits.check_tokens(caller, payload)
        self.route = await route_for(payload.get("model"), caller, self.state)
        return self.route, body, payload.get("stream") is True

    async def _serve(self, route: Target, path: str, body: bytes, stream: bool) -> None:
        try:
            upstream = await self._open(route, path, body, stream)
        except ApplianceError as exc:
            if self.sse_started:
                self.status = error_status(exc)
                await self._body(sse_error(exc), more=False)
            else:
                self.status = await send_json_error(self.send, exc)
            return
        try:
            if self.sse_started:
                await self._relay_into_sse(upstream)
            elif upstream.content_length is not None and (
                upstream.content_length <= WHOLE_BODY_MAX_BYTES
            ):
                await self._relay_whole(upstream)
            else:
                await self._relay_stream(upstream)
        finally:
            upstream.close()

    async def _open(self, route: Target, path: str, body: bytes, stream: bool) -> Upstream:
        """Open upstream; a stream that has to wait for a replica starts its SSE reply now
        and sends keep-alive comments until the replica answers."""
        fwd = self.forwarder
        hold_s = self.state.settings.activation_timeout_s
        if not stream or fwd.ready_now(route):
            return await fwd.open(route, path, body, hold_s=hold_s)
        opening = asyncio.ensure_future(fwd.open(route, path, body, hold_s=hold_s))
        try:
            await self._start(200, SSE_HEADERS)
            self.sse_started = True
            every_s = self.state.settings.stream_keepalive_s
            while not (await asyncio.wait({opening}, timeout=every_s))[0]:
                await self._body(KEEPALIVE)
            return opening.result()
        except BaseException:
            opening.cancel()  # the client went away while we waited (no-op when done)
            opening.add_done_callback(close_quietly)
            raise

    def _headers(self, upstream: Upstream, ready_at: float) -> list[tuple[bytes, bytes]]:
        now = time.perf_counter()
        self.overhead_s = (upstream.sent_at - self.started_at - upstream.waited_s) + (
            now - ready_at
        )
        headers = list(upstream.headers)
        headers.append((b"x-appliance-overhead-ms", f"{self.overhead_s * 1000:.3f}".encode()))
        if upstream.waited_s >= 0.001:
            headers.append((b"x-appliance-wait-ms", f"{upstream.waited_s * 1000:.0f}".encode()))
        return headers

    async def _relay_whole(self, upstream: Upstream) -> None:
        try:
            data = await upstream.read()
        except UpstreamError as exc:
            self.status = await send_json_error(self.send, exc)
            return
        self.status = upstream.status
        if upstream.status == 200:
            self.usage = usage_from_json(data)
        await self._start(upstream.status, self._headers(upstream, time.perf_counter()))
        await self._body(data, more=False)

    async def _relay_stream(self, upstream: Upstream) -> None:
        self.status = upstream.status
        await self._start(upstream.status, self._headers(upstream, upstream.headers_at))
        await self._pump(upstream)

    async def _relay_into_sse(self, upstream: Upstream) -> None:
        self.status = upstream.status
        self.overhead_s = upstream.sent_at - self.started_at - upstream.waited_s
        if upstream.status != 200:
            data = await upstream.read()
            message = data.decode("utf-8", "replace")[:2000]
            await self._body(sse_error(UpstreamError(message, status_code=upstream.status)), False)
            return
        await self._pump(upstream)

    async def _pump(self, upstream: Upstream) -> None:
        """Pass the body through as it arrives; an upstream failure ends it in band."""
        watch = StreamUsage()
        send = self.send
        first = True
        try:
            async for chunk in upstream.chunks():
                if first:
                    self.ttft_s = time.perf_counter() - self.started_at
                    first = False
                watch.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            self.status = exc.status_code
            await self._body(sse_error(exc), more=False)
            return
        if upstream.status == 200:
            self.usage = watch.result()
        await self._body(b"", more=False)

    async def _start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})


def close_quietly(opening: asyncio.Future[Upstream]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


@router.get("/v1/models")
async def read_models(state: StateDep, caller: CallerDep) -> dict[str, Any]:
    routes = [
        r for r in state.forwarder.table.by_name.values() if caller.may_infer(r.owner, r.public)
    ]
    now = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": r.name, "object": "model", "created": now, "owned_by": r.owner} for r in routes
        ],
    }
