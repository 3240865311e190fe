"""The inference fast lane: admits a request without awaiting anything and relays it to a
replica through callbacks. `api/front.py` hands it each request it parsed.

A request is admitted only on the common path: a key verified less than a second ago with the
`inference` scope and no rate limits, a JSON body naming an endpoint the key may call, a ready
replica under its cap. Everything else (a key to verify, limits to count in Redis, a cold start
to wait for, a queue for a slot, CORS, any 4xx) is declined, and `api/front.py` hands the
untouched request to the general path (`api/routes/openai.py`), which answers it as always.
Once sent, a failure before any reply byte (a stale pooled connection, a replica that died) is
handed over too, so the general path retries it on another replica.

Both paths share the forwarder's counters, routing table, ejections, metrics and usage ledger.
"""

from __future__ import annotations

import asyncio
import http
import json
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from api.deps import cached_caller, parse_key
from api.routes.openai import (
    CLIENT_CLOSED,
    UPSTREAM_PATHS,
    WHOLE_BODY_MAX_BYTES,
    json_error,
    sse_error,
    visible,
)
from appliance.errors import UpstreamError
from forwarder.routing import ReplicaRoute, Route
from forwarder.upstream import Connection, UpstreamPool
from forwarder.usage import StreamUsage, usage_from_json

if TYPE_CHECKING:
    from api.deps import AppState

HOT_PATHS = {ours.encode(): theirs.encode() for ours, theirs in UPSTREAM_PATHS.items()}
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
SMALL_BODY_BYTES = 64 * 1024  # sent in one write with its head
_decoder = json.JSONDecoder()
MAX_PREFIXES = 256  # reply heads kept (status and content type vary little)
TIMEOUT_CHECK_EVERY_S = 0.25  # upstream timeouts are checked for all exchanges at once


class Head(NamedTuple):
    """What the fast lane needs from a request head (see `api/front.parse_head`)."""

    upstream_path: bytes
    length: int
    authorization: str
    api_key: str | None
    origin: bool
    keep_alive: bool


class Client(Protocol):
    """The client connection an exchange answers on (`api/front.FrontProtocol`)."""

    def write(self, data: bytes) -> None: ...

    def default_headers(self) -> list[tuple[bytes, bytes]]:
        """uvicorn's default response headers (date, server); a new list when they change."""

    def finished(self, keep_alive: bool) -> None:
        """The reply is complete; the connection may carry the next request."""

    def abandon(self) -> None:
        """Nothing was written: give the request to the general path."""

    def close(self) -> None:
        """The reply broke after its head went out: the client must see a short reply."""


class FastLane:
    """One per api process, made in the lifespan."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.forwarder = state.forwarder
        self.pool = UpstreamPool()
        self.max_body_bytes = state.settings.max_body_bytes
        self.cors = bool(state.settings.cors_origins)
        self.connecting: set[asyncio.Task[Connection]] = set()
        self.waiting: set[Exchange] = set()  # sent, reply not complete
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._prefixes: dict[tuple[int, tuple[tuple[bytes, bytes], ...], bool], bytes] = {}
        self.loop = asyncio.get_running_loop()
        self._checker = self.loop.call_later(TIMEOUT_CHECK_EVERY_S, self._check_timeouts)

    def close(self) -> None:
        self._checker.cancel()
        for task in self.connecting:
            task.cancel()
        self.pool.close()

    def _check_timeouts(self) -> None:
        """One timer for every exchange instead of one per request."""
        now = self.loop.time()
        late = [x for x in self.waiting if now - x.heard_at >= x.timeout_s]
        for exchange in late:
            exchange.time_out()
        self._checker = self.loop.call_later(TIMEOUT_CHECK_EVERY_S, self._check_timeouts)

    def head_prefix(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        defaults: list[tuple[bytes, bytes]],
    ) -> bytes:
        """Status line and headers of a reply, but for its framing and overhead: the same for
        most replies, so made once per second (uvicorn renews its date header each second)."""
        if defaults is not self._defaults:
            self._defaults = defaults
            self._prefixes = {}
        key = (status, tuple(headers), keep_alive)
        found = self._prefixes.get(key)
        if found is None:
            lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
            lines.extend(b"%b: %b\r\n" % h for h in (*defaults, *headers))
            if not keep_alive:
                lines.append(b"connection: close\r\n")
            found = b"".join(lines)
            if len(self._prefixes) < MAX_PREFIXES:
                self._prefixes[key] = found
        return found

    def admit(self, head: Head, body: bytes, client: Client) -> Exchange | None:
        """A started exchange, or None to decline (nothing was counted or sent)."""
        authorization = head.authorization
        if authorization[:7] == "Bearer ":  # the usual form, without parse_key's general case
            key: str | None = authorization[7:].strip()
        else:
            key = parse_key(authorization, head.api_key)
        caller = cached_caller(self.state, key) if key else None
        if caller is None or (head.origin and self.cors):
            return None
        if not caller.is_admin and "inference" not in caller.scopes:
            return None
        limits = caller.limits
        if limits.requests_per_minute or limits.max_concurrent_requests:
            return None
        if limits.max_tokens_per_request:
            return None
        try:  # json.loads(bytes) would first guess the encoding, a third of its cost
            text = body.decode()
            payload, end = _decoder.raw_decode(text)
        except ValueError:  # UnicodeDecodeError too
            return None
        if end != len(text) and text[end:].strip():
            return None
        if not isinstance(payload, dict) or not isinstance(model := payload.get("model"), str):
            return None
        route = visible(self.forwarder.table.by_name.get(model), caller)
        if route is None:
            return None
        replica = self.forwarder.try_acquire(route)
        if replica is None:
            return None
        exchange = Exchange(self, client, route, replica, caller.key_id, head.keep_alive)
        exchange.begin(head.upstream_path, body, stream=payload.get("stream") is True)
        return exchange


class Exchange:
    """One admitted request, from its send to the last byte of its reply (a `ReplySink`)."""

    __slots__ = (
        "chunked",
        "client",
        "conn",
        "done",
        "headers",
        "heard_at",
        "keep_alive",
        "key_id",
        "lane",
        "overhead_s",
        "parts",
        "replica",
        "request",
        "route",
        "sent_at",
        "started_at",
        "status",
        "stream",
        "timeout_s",
        "ttft_s",
        "watch",
        "wrote",
    )

    def __init__(
        self,
        lane: FastLane,
        client: Client,
        route: Route,
        replica: ReplicaRoute,
        key_id: str,
        keep_alive: bool,
    ) -> None:
        self.lane = lane
        self.client = client
        self.route = route
        self.replica = replica
        self.key_id = key_id
        self.keep_alive = keep_alive
        self.started_at = time.perf_counter()
        self.sent_at = self.started_at
        self.conn: Connection | None = None
        self.stream = False
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.parts: list[bytes] | None = None  # a whole reply being gathered
        self.chunked = False
        self.wrote = False  # any byte reached the client
        self.done = False
        self.ttft_s: float | None = None
        self.overhead_s: float | None = None
        self.watch: StreamUsage | None = None
        self.timeout_s = route.timeout_s or lane.forwarder.limits.timeout_s
        self.heard_at = 0.0  # loop time of the send or of the last upstream event
        self.request: bytes | tuple[bytes, bytes] = b""  # until sent

    # sending
    def begin(self, path: bytes, body: bytes, *, stream: bool) -> None:
        self.stream = stream
        pool = self.lane.pool
        address = self.replica.address
        head = b"POST %b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n" % (
            path,
            pool.host_header(address),
        )
        head += b"content-length: %d\r\n\r\n" % len(body)
        self.request = head + body if len(body) <= SMALL_BODY_BYTES else (head, body)
        conn = pool.take(address)
        if conn is not None:
            self._send(conn)
            return
        task = self.lane.loop.create_task(pool.connect(address))
        self.lane.connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Connection]) -> None:
        self.lane.connecting.discard(task)
        if task.cancelled():  # the api is shutting down
            if self._settle(ok=True):
                self.client.close()
            return
        if task.exception() is not None:
            if not self.done:
                self._give_up(ok=False)
            return
        conn = task.result()
        if self.done:  # the client left while it connected
            conn.abort()
            return
        self._send(conn)

    def _send(self, conn: Connection) -> None:
        self.conn = conn
        self.heard_at = self.lane.loop.time()
        self.lane.waiting.add(self)
        self.sent_at = time.perf_counter()
        request = self.request
        if isinstance(request, tuple):
            conn.send(request[0], self)
            assert conn.transport is not None
            conn.transport.write(request[1])
        else:
            conn.send(request, self)
        self.request = b""

    # the reply (ReplySink)
    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.heard_at = self.lane.loop.time()
        self.status = status
        self.headers = headers
        if not self.stream and length is not None and length <= WHOLE_BODY_MAX_BYTES:
            self.parts = []
            return
        self.watch = StreamUsage()
        self.chunked = length is None
        extra = b"transfer-encoding: chunked\r\n" if self.chunked else b""
        self.client.write(self._head(headers, extra, time.perf_counter()))
        self.wrote = True

    def on_body(self, data: bytes) -> None:
        self.heard_at = self.lane.loop.time()
        if self.parts is not None:
            self.parts.append(data)
            return
        if self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started_at
        assert self.watch is not None
        self.watch.feed(data)
        self.client.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    def on_reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self.stream or len(body) > WHOLE_BODY_MAX_BYTES:
            self.on_head(status, headers, len(body))
            if body:
                self.on_body(body)
            self.on_end()
            return
        ready_at = time.perf_counter()
        self.status = status
        usage = usage_from_json(body) if status == 200 else None
        passed = headers[:1] if len(headers) == 2 else headers[:0]  # content-type, if any
        length = b"content-length: %d\r\n" % len(body)
        self.client.write(self._head(passed, length, ready_at) + body)
        self.wrote = True
        self._finish(status, ok=status < 500, usage=usage)
        self.client.finished(self.keep_alive)

    def on_end(self) -> None:
        usage = None
        ready_at = time.perf_counter()
        if self.parts is not None:
            data = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
            if self.status == 200:
                usage = usage_from_json(data)
            headers = [h for h in self.headers if h[0] != b"content-length"]
            length = b"content-length: %d\r\n" % len(data)
            self.client.write(self._head(headers, length, ready_at) + data)
            self.wrote = True
        else:
            if self.chunked:
                self.client.write(b"0\r\n\r\n")
            if self.status == 200 and self.watch is not None:
                usage = self.watch.result()
        self._finish(self.status, ok=self.status < 500, usage=usage)
        self.client.finished(self.keep_alive)

    def on_lost(self, reason: str) -> None:
        conn = self.conn
        if not self.status and conn is not None:
            # No reply at all: a pooled connection the replica had closed is no failure of
            # the replica; either way the general path sends the request again.
            self._give_up(ok=conn.reused)
            return
        self._fail(UpstreamError(f"the replica failed mid-reply: {reason}"))

    # ends
    def _head(self, headers: list[tuple[bytes, bytes]], extra: bytes, ready_at: float) -> bytes:
        """The reply's head; the overhead is the time before the send plus the time since the
        reply was ready to go (`ready_at`)."""
        prefix = self.lane.head_prefix(
            self.status, headers, self.keep_alive, self.client.default_headers()
        )
        self.overhead_s = (self.sent_at - self.started_at) + (time.perf_counter() - ready_at)
        return b"%bx-appliance-overhead-ms: %.3f\r\n%b\r\n" % (
            prefix,
            self.overhead_s * 1000,
            extra,
        )

    def time_out(self) -> None:
        """The replica was silent for the timeout: end it like the general path's 504."""
        if self.conn is not None:
            self.conn.abort()
        name = self.route.name
        self._fail(UpstreamError(f"replica of {name!r} did not answer in time", status_code=504))

    def _fail(self, exc: UpstreamError) -> None:
        """The reply cannot be completed: an error where no byte went out yet, in band on a
        stream, else a cut connection."""
        if self.done:
            return
        if not self.wrote:
            status, headers, body = json_error(exc)
            self.status = status
            self.client.write(self._head(headers, b"", time.perf_counter()) + body)
            self._finish(status, ok=False, usage=None)
            self.client.finished(self.keep_alive)
            return
        self._finish(exc.status_code, ok=False, usage=None)
        if self.stream and self.status == 200 and self.chunked:
            event = sse_error(exc)
            self.client.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))
            self.client.finished(self.keep_alive)
        else:
            self.client.close()

    def _give_up(self, *, ok: bool) -> None:
        """Hand the request to the general path; nothing reached the client."""
        self._settle(ok)
        self.client.abandon()

    def client_gone(self) -> None:
        """The client disconnected: drop the upstream request so the replica stops too."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.abort()
        self._finish(CLIENT_CLOSED, ok=True, usage=None)

    def pause(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def resume(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    def _settle(self, ok: bool) -> bool:
        """Release the replica once; False when already done."""
        if self.done:
            return False
        self.done = True
        self.lane.waiting.discard(self)
        self.lane.forwarder.done(self.route, self.replica.id, ok)
        return True

    def _finish(self, status: int, *, ok: bool, usage: tuple[int, int] | None) -> None:
        if not self._settle(ok):
            return
        stats = self.lane.forwarder.metrics.stats  # Forwarder.record, without its indirection
        stats.fast_lane += 1
        duration_s = time.perf_counter() - self.started_at
        stats.add(
            self.route.name, self.key_id, status, duration_s, self.overhead_s, self.ttft_s, usage
        )
