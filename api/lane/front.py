"""The api's first protocol on every connection: serves the inference hot path itself through
the fast lane and hands everything else to uvicorn's own HTTP protocol.

uvicorn makes one `FrontProtocol` per connection (`http=` in `api/serve.py`). For each request
it reads the head with a deliberately narrow parser: `POST` to an inference path over HTTP/1.1
with a Content-Length body, no Transfer-Encoding, Expect or Upgrade. If `api/lane/admit.py`
admits it, the reply is relayed with no ASGI cycle, task or coroutine. Any other request, and
any the lane declines, is handed with all of its bytes (nothing consumed) to uvicorn's
httptools protocol, the way uvicorn itself switches a connection to its websocket protocol;
that one gives the connection back once its reply is complete (`GeneralProtocol`). So every
route keeps its one implementation, and the fast lane is only ever a shortcut for requests the
general path would answer the same way.

Client header bytes are parsed here but never forwarded: the lane writes its own request to
the replica, so a head this parser reads differently from httptools cannot reach a replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from fastapi import FastAPI
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from api.lane.admit import HOT_PATHS, FastLane, Head
from api.lane.exchange import Exchange
from forwarder.scan import SP, digits, field, named, starts

MAX_HEAD_BYTES = 16 * 1024  # a longer head goes to uvicorn, which has its own limits
PIPELINED_MAX_BYTES = 64 * 1024  # buffered while a reply is in progress, then reading pauses


def parse_head(buf: bytes, end: int) -> Head | None:
    """The head `buf[:end]` if the fast lane may serve it, else None. Read byte by byte
    (`forwarder/scan.py`); any field line that is not a plain `name: value` sends the request
    to uvicorn, as do the framings the lane does not do (Transfer-Encoding, Expect, Upgrade)."""
    if not starts(buf, 0, b"POST "):
        return None
    at = 5
    while at < end and buf[at] != SP:
        at += 1
    if not starts(buf, at, b" HTTP/1.1\r\n") or at + 11 > end:
        return None  # also no header at all, so no Content-Length
    upstream_path = HOT_PATHS.get(buf[5:at])
    if upstream_path is None:
        return None
    length = -1
    authorization = ""
    api_key = None
    origin = False
    keep_alive = True
    at += 11
    while at < end:
        colon, start, stop, after = field(buf, at, end)
        if colon < 0:
            return None
        size = colon - at  # the name's: the field is looked at only if that one may match
        if size == 14 and named(buf, at, colon, b"content-length"):
            if length >= 0:
                return None
            length = digits(buf, start, stop)
            if length < 0:
                return None
        elif size == 13 and named(buf, at, colon, b"authorization"):
            authorization = buf[start:stop].decode("latin-1")
        elif size == 9 and named(buf, at, colon, b"x-api-key"):
            api_key = buf[start:stop].decode("latin-1")
        elif size == 6 and named(buf, at, colon, b"origin"):
            origin = True
        elif size == 10 and named(buf, at, colon, b"connection"):
            # any `close` ends the connection; find, not `in`: see upstream.whole_reply
            keep_alive = keep_alive and buf[start:stop].lower().find(b"close") < 0
        elif (
            (size == 17 and named(buf, at, colon, b"transfer-encoding"))
            or (size == 6 and named(buf, at, colon, b"expect"))
            or (size == 7 and named(buf, at, colon, b"upgrade"))
        ):
            return None  # a framing the lane does not do
        at = after
    if length < 0:
        return None
    return Head(upstream_path, length, authorization, api_key, origin, keep_alive)


def front_protocol(app: FastAPI) -> Callable[..., FrontProtocol]:
    """What uvicorn should make each connection's protocol with (`http=`, called like its own
    protocol classes), for `app`, which holds the lane once started. A factory rather than a
    subclass per app: the compiled build of this module (`setup.py`) allows no subclasses."""

    def make(
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> FrontProtocol:
        return FrontProtocol(app, config, server_state, app_state, _loop)

    return make


class GeneralProtocol(HttpToolsProtocol):
    """uvicorn's own protocol, which gives the connection back to the front protocol when a
    reply is complete and no byte of a next request has been read: so a request the lane
    declined (a key to verify, a cold start) does not keep its connection off the lane."""

    between = False  # the last request was read to its end and no next one has begun
    fastapi: FastAPI  # set by the front protocol that hands it the connection

    def on_message_begin(self) -> None:
        self.between = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.between = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        transport = self.transport
        if not self.between or self.pipeline or transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        front = FrontProtocol(
            self.fastapi, self.config, self.server_state, self.app_state, self.loop
        )
        front.connection_made(transport)
        front.write_paused = self.flow.write_paused
        transport.set_protocol(front)
        front.serve()


class FrontProtocol(asyncio.Protocol):
    def __init__(
        self,
        app: FastAPI,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""  # unconsumed bytes; while a reply runs, its request is at the start
        self.more: list[bytes] = []  # chunks of a body still arriving
        self.need = 0  # bytes needed in all before parsing again
        self.have = 0
        self.consumed = 0  # length of the request in progress
        self.exchange: Exchange | None = None
        self.lane: FastLane | None = None
        self.idle_timer: asyncio.TimerHandle | None = None  # armed once, re-armed when it fires
        self.idle_since: float | None = None  # loop time the last reply ended; None: busy
        self.write_paused = False
        self.closing = False
        self.handed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.server_state.connections.add(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._cancel_idle()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.client_gone()

    def data_received(self, data: bytes) -> None:
        self.idle_since = None
        if self.need:
            self.more.append(data)
            self.have += len(data)
            if self.have < self.need:
                return
            self.buffer = b"".join([self.buffer, *self.more])
            self.more = []
            self.need = 0
        else:
            self.buffer = self.buffer + data if self.buffer else data
        if self.exchange is None:
            self.serve()
        elif len(self.buffer) > PIPELINED_MAX_BYTES and self.transport is not None:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume()

    # uvicorn's server calls this on graceful shutdown
    def shutdown(self) -> None:
        if self.exchange is None:
            if self.transport is not None:
                self.transport.close()
        else:
            self.closing = True

    # requests
    def serve(self) -> None:
        """Serve the buffered requests in order until one is incomplete or handed over."""
        while self.exchange is None and self.buffer and not self.handed:
            buf = self.buffer
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
            if end < 0:
                if len(buf) >= MAX_HEAD_BYTES:
                    self._hand_over()
                return
            lane = self.lane or self._find_lane()
            head = parse_head(buf, end)
            if lane is None or head is None or head.length > lane.max_body_bytes:
                self._hand_over()
                return
            total = end + 4 + head.length
            if len(buf) < total:
                self.need, self.have = total, len(buf)
                return
            self.consumed = total
            self.exchange = lane.admit(head, buf[end + 4 : total], self)
            if self.exchange is None:
                self._hand_over()
                return
        if self.exchange is None and not self.handed and not self.buffer:
            self._idle()

    def _idle(self) -> None:
        """Between requests: the keep-alive timeout runs from now."""
        self.idle_since = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(
                self.config.timeout_keep_alive, self._idle_timeout
            )

    def _find_lane(self) -> FastLane | None:
        """The app's lane, once its lifespan made it (until then every request goes on)."""
        self.lane = getattr(self.app.state, "fast_lane", None)
        return self.lane

    def _hand_over(self) -> None:
        """Give the connection, with every unconsumed byte, to uvicorn's own protocol."""
        assert self.transport is not None
        self.handed = True
        self.exchange = None
        self._cancel_idle()
        self.server_state.connections.discard(self)
        protocol = GeneralProtocol(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        protocol.fastapi = self.app
        protocol.connection_made(self.transport)
        self.transport.set_protocol(protocol)
        if self.write_paused:
            protocol.pause_writing()
        if not self.transport.is_reading():
            self.transport.resume_reading()
        data = b"".join([self.buffer, *self.more])
        self.buffer, self.more, self.need = b"", [], 0
        if data:
            protocol.data_received(data)

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_timeout(self) -> None:
        """Close a connection idle for uvicorn's keep-alive timeout; busy or lately active,
        look again when it could be."""
        self.idle_timer = None
        left: float
        if self.idle_since is None:
            left = float(self.config.timeout_keep_alive)
        else:
            left = self.idle_since + self.config.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.idle_timer = self.loop.call_later(left, self._idle_timeout)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # api.lane.admit.Client
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.server_state.default_headers

    def finished(self, keep_alive: bool) -> None:
        self.exchange = None
        self.server_state.total_requests += 1
        self.buffer = self.buffer[self.consumed :]
        self.consumed = 0
        assert self.transport is not None
        if not keep_alive or self.closing:
            self.transport.close()
            return
        if not self.transport.is_reading():
            self.transport.resume_reading()
        if self.buffer:
            self.serve()  # a pipelined request
        else:
            self._idle()

    def abandon(self) -> None:
        self._hand_over()

    def close(self) -> None:
        self.exchange = None
        if self.transport is not None:
            self.transport.close()
