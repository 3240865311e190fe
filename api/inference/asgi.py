"""The inference routes over ASGI: the transport of every inference request the fast lane does
not carry (`APPLIANCE_FAST_LANE=false`, a framing the lane does not read, CORS) and of the
playground's chat. `InferenceRoutes` is pure ASGI middleware in front of FastAPI: a POST to a
path of `forwarder/paths.py` becomes a `Call` (`api/inference/call.py`), the same as on the
lane; `AsgiClient` turns the call's writes into ASGI messages.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bodies import Reading
from api.deps import key_of_raw
from api.inference.call import Call, Core
from api.inference.llm_engine import make_call
from api.shield import bucket_of
from appliance.errors import ApplianceError, BodyTooLargeError
from appliance.keys import Caller
from forwarder.paths import BY_PATH, InferencePath
from forwarder.relay import Headers

QUEUED_MAX: Final = 64  # messages waiting for the client before the relay pauses
END: Final[Message] = {"type": "http.response.body", "body": b"", "more_body": False}

SHUTDOWN_DRAIN_S: Final = 2.0  # to send what a call says as the api stops


class ConnectionCutError(Exception):
    """The reply broke after its head went out; raised so the server closes the connection."""


class InferenceRoutes:
    """Pure ASGI middleware serving the inference POST routes; everything else goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            entry = BY_PATH.get(scope["path"])
            if entry is not None:
                await serve(scope["app"].state.inference, entry, scope, receive, send)
                return
        await self.app(scope, receive, send)


async def serve(
    core: Core,
    entry: InferencePath,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    caller: Caller | None = None,
    body: bytes | None = None,
) -> None:
    """Serve one inference request; `caller` and `body` when a route read them already (the
    playground's, counted by its client's address as the UI's forms are). Its body's bytes of
    the budget of bodies in flight are the call's, given back when it ends (`api/bodies.py`)."""
    client = AsgiClient(send)
    key = None if caller is not None else key_of_raw(scope["headers"])
    query = scope.get("query_string", b"").decode("latin-1")
    call = make_call(core, entry, client, key, query, caller)
    client.call = call
    bucket = (key or "") if caller is None else bucket_of(scope, scope["path"])
    reading = Reading(core.bodies, bucket)
    call.reading = reading
    try:
        if body is None:
            body = await read_body(scope, receive, core.max_body_bytes, reading)
        elif refused := reading.upto(len(body)):
            raise refused
    except ApplianceError as exc:  # too large, or no room in the budget of bodies in flight
        client.close = True  # its body is not read through
        call.refuse(exc)
        await client.drain()
        return
    except asyncio.CancelledError:
        call.client_gone()  # gone before it sent its body
        return
    watcher = asyncio.ensure_future(_disconnect(receive, call, client))
    try:
        call.start(body)
        await client.drain()
    except asyncio.CancelledError:
        # uvicorn ends a request still running past its graceful wait as the api stops:
        # the client is told so, and the request's task ends without an error of its own
        call.shut_down()
        await asyncio.wait_for(client.drain(), SHUTDOWN_DRAIN_S)
    finally:
        watcher.cancel()


async def _disconnect(receive: Receive, call: Call, client: AsgiClient) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if not client.finished:
        call.client_gone()
        client.gone()


async def read_body(scope: Scope, receive: Receive, limit: int, reading: Reading) -> bytes:
    """The whole request body; BodyTooLargeError as soon as it is known to be over `limit`, and
    the budget's refusal when its bytes would pass the key's share or the process's bodies in
    flight (`api/bodies.py`): `reading` takes a declared length before a byte is read, a
    chunked body's bytes as they come; its call gives them back when it ends."""
    too_large = (
        f"the request body is over this route's {limit} bytes "
        "(the setting APPLIANCE_MAX_BODY_BYTES)"
    )
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            if int(value) > limit:
                raise BodyTooLargeError(too_large)
            if refused := reading.upto(int(value)):
                raise refused
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected")
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise BodyTooLargeError(too_large)
        if refused := reading.upto(size):  # a chunked body, counted as it comes
            raise refused
        parts.append(part)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class AsgiClient:
    """A call's writes as ASGI messages, sent in order by `drain` (ASGI's send is awaited; the
    call writes from callbacks). When the client reads slowly, the relay pauses."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.call: Call | None = None
        self.queue: collections.deque[Message | None] = collections.deque()  # None: cut
        self.ready = asyncio.Event()
        self.finished = False
        self.paused = False
        self.close = False  # the request's body was not read through: the connection closes

    def _put(self, message: Message | None) -> None:
        self.queue.append(message)
        self.ready.set()
        if len(self.queue) > QUEUED_MAX and not self.paused and self.call is not None:
            self.paused = True
            self.call.pause()

    def start(
        self, status: int, headers: Headers, length: int, overhead_s: float, waited_s: float
    ) -> None:
        headers = list(headers)
        if length >= 0:
            headers.append((b"content-length", b"%d" % length))
        self._put(_head(status, headers, overhead_s, waited_s))

    def send(self, data: bytes) -> None:
        self._put({"type": "http.response.body", "body": data, "more_body": True})

    def end(self) -> None:
        self._put(END)

    def whole(
        self, status: int, headers: Headers, body: bytes, overhead_s: float, waited_s: float
    ) -> None:
        headers = [*headers, (b"content-length", b"%d" % len(body))]
        if self.close:
            headers.append((b"connection", b"close"))
        self._put(_head(status, headers, overhead_s, waited_s))
        self._put({"type": "http.response.body", "body": body, "more_body": False})

    def cut(self) -> None:
        self._put(None)

    def gone(self) -> None:
        """The client disconnected: nothing more is sent."""
        self.finished = True
        self.ready.set()

    async def drain(self) -> None:
        """Send what the call writes until its reply is complete (or the client is gone)."""
        while not self.finished:
            await self.ready.wait()
            self.ready.clear()
            while self.queue and not self.finished:
                message = self.queue.popleft()
                if message is None:
                    self.finished = True
                    raise ConnectionCutError("the replica's reply broke off")
                await self._send(message)
                if message["type"] == "http.response.body" and not message["more_body"]:
                    self.finished = True
            if self.paused and len(self.queue) < QUEUED_MAX // 2 and self.call is not None:
                self.paused = False
                self.call.resume()


def _head(status: int, headers: Headers, overhead_s: float, waited_s: float) -> Message:
    if overhead_s >= 0:
        headers = [*headers, (b"x-appliance-overhead-ms", b"%.3f" % (overhead_s * 1000))]
    if waited_s >= 0.001:
        headers = [*headers, (b"x-appliance-wait-ms", b"%.0f" % (waited_s * 1000))]
    return {"type": "http.response.start", "status": status, "headers": headers}
