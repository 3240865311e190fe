"""One request the fast lane admitted (`api/lane/admit.py`), from its send to the last byte
of its reply: the replica's reply arrives as callbacks (`forwarder/upstream.ReplySink`) and
goes to the client as it comes, or whole when it is small; errors as the general path would
answer them (504 when the replica is silent, 502 when it breaks off, in band on a stream)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from api.routes.openai import CLIENT_CLOSED, WHOLE_BODY_MAX_BYTES, json_error, sse_error
from appliance.errors import UpstreamError
from forwarder.table import Target, TargetReplica
from forwarder.upstream import Connection
from forwarder.usage import StreamUsage, usage_from_json

if TYPE_CHECKING:
    from api.lane.admit import Client, FastLane

SMALL_BODY_BYTES = 64 * 1024  # sent in one write with its head


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
        route: Target,
        replica: TargetReplica,
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
        self.heard_at = 0.0  # perf_counter() of the send or of the last upstream event
        self.request: bytes | tuple[bytes, bytes] = b""  # until sent

    # sending
    def begin(self, path: bytes, body: bytes, *, stream: bool) -> None:
        self.stream = stream
        pool = self.lane.pool
        address = self.replica.address
        head = pool.json_post_head(path, address)
        if len(body) <= SMALL_BODY_BYTES:
            self.request = b"%b%d\r\n\r\n%b" % (head, len(body), body)
        else:
            self.request = (b"%b%d\r\n\r\n" % (head, len(body)), body)
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
        self.heard_at = self.sent_at = time.perf_counter()
        self.lane.waiting.add(self)
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
        self.heard_at = time.perf_counter()
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
        self.heard_at = now = time.perf_counter()
        if self.parts is not None:
            self.parts.append(data)
            return
        if self.ttft_s is None:
            self.ttft_s = now - self.started_at
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
        self.lane.balancer.done(self.route, self.replica.id, ok)
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
