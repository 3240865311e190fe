"""One request to a replica, from the send to the last byte of its reply: the data plane's one
relay, under every inference request the api serves (`api/inference/call.py`) and every task
the worker runs (`Forwarder.fetch`).

The caller has admitted the request and taken a replica under its cap (`Balancer.take`, or
`Forwarder.acquire` when it had to wait). `Relay` sends the request over a pooled keep-alive
connection (`forwarder/upstream.py`) and passes the reply to a `Reply` as it arrives: whole
when it is small and not a stream, else head, chunks and end. A connection that fails before
any reply byte is tried again, on another replica when there is one; a replica silent past its
timeout ends the request with a 504 (`Forwarder` checks every relay in flight on one timer);
a failure counts towards the replica's ejection. When the reply ends, its token usage and its
metrics are recorded, once: a stream cut short (its client left, the replica failed or went
silent) counts what its client was sent (`forwarder/usage.StreamUsage.counted`).

Compiled with the rest of the hot path (`setup.py`): no task, future or coroutine per request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Final, Protocol

from appliance.errors import ApplianceError, UpstreamError
from forwarder.balance import Balancer
from forwarder.llama_cpp import Shape, shape_for
from forwarder.metrics import RequestStats
from forwarder.table import DELETING, RoutingTable, Target, TargetReplica
from forwarder.upstream import Connection, UpstreamPool
from forwarder.usage import CLIENT_CLOSED, StreamUsage, token_mark, usage_from_json

# A replica's own error for one request (llama.cpp: 500 for an image it cannot read, 501 for
# a route it lacks) says nothing of its health: it does not count towards ejection, or one
# caller's bad requests would take a replica out of rotation for everyone. A dead engine
# fails its health route, which the builder watches.
REQUEST_ERRORS: Final = (500, 501)


def healthy(status: int) -> bool:
    """Whether a replica that answered `status` is well (a failure counts towards ejection)."""
    return status < 500 or status in REQUEST_ERRORS


if TYPE_CHECKING:
    from prometheus_client import Counter

    from forwarder.proxy import Forwarder

WHOLE_BODY_MAX_BYTES = 1024 * 1024  # replies this small with a length are read, then passed on
SMALL_BODY_BYTES = 64 * 1024  # request bodies sent in one write with their head
CONNECT_ATTEMPTS = 3  # sends of one request when connections fail before any reply byte

FAILURE_LOG_EVERY_S = 10.0  # per endpoint: one log line, then a count of those not logged
FAILURE_DETAIL_CHARS = 300  # of a replica's error reply, in the log
SHUTTING_DOWN = "the appliance is shutting down; send the request again once it is back"

Headers = list[tuple[bytes, bytes]]

logger = logging.getLogger(__name__)


class FailureLog:
    """Requests that ended in a 5xx, as lines an operator reads in the api's or the worker's log
    (endpoint, replica, status, why), where metrics only counted them: the first of an
    endpoint, then at most one every FAILURE_LOG_EVERY_S saying how many were not logged
    since, so a failing replica under load does not flood the log. A success logs nothing."""

    def __init__(self, clock: Callable[[], float] = monotonic) -> None:
        self.clock = clock
        self.last: dict[str, float] = {}
        self.unlogged: dict[str, int] = {}

    def note(self, endpoint: str, replica: str, status: int, why: str) -> None:
        if why == SHUTTING_DOWN:  # the appliance stopping is no failure of the endpoint's
            return
        now = self.clock()
        last = self.last.get(endpoint)
        if last is not None and now - last < FAILURE_LOG_EVERY_S:
            self.unlogged[endpoint] = self.unlogged.get(endpoint, 0) + 1
            return
        self.last[endpoint] = now
        more = self.unlogged.pop(endpoint, 0)
        since = f" ({more} more since the last such line)" if more else ""
        logger.warning("endpoint %s, replica %s: %d, %r%s", endpoint, replica, status, why, since)


class Reply(Protocol):
    """Where a relayed reply goes. Exactly one of: `on_whole`; `on_head`, `on_body`...,
    `on_end`; `on_failed` (possibly after `on_head` and some body: the reply broke)."""

    def on_head(self, status: int, headers: Headers, length: int) -> None:
        """A reply passed on as it arrives; `length` is its Content-Length, -1 when unknown."""

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_whole(self, status: int, headers: Headers, body: bytes) -> None:
        """A small reply, read whole (`headers` without its Content-Length)."""

    def on_failed(self, exc: ApplianceError) -> None:
        """The reply could not be had or broke off: a replica failed (UpstreamError), timed
        out (its 504), or none would take the request (CapacityError)."""

    def on_wait(self, waiting: bool) -> None:
        """The request's replica failed it before any reply byte and no other is free: it
        waits for one, as at a cold start (True), until one takes it (False)."""


class Plane:
    """What every relay of one process reads, made by its `Forwarder`: compiled, plain struct
    reads instead of attribute lookups on the forwarder."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.pool: UpstreamPool = forwarder.pool
        self.balancer: Balancer = forwarder.balancer
        self.stats: RequestStats = forwarder.metrics.stats
        self.retries: Counter = forwarder.metrics.retries
        self.timeout_s: float = forwarder.limits.timeout_s
        self.table: RoutingTable = forwarder.table  # the current one (`Forwarder.update`)
        self.loop: asyncio.AbstractEventLoop | None = None  # once started
        self.waiting: set[Relay] = set()  # sent, reply not complete
        self.failures = FailureLog()
        self.connecting: set[asyncio.Task[Connection]] = set()
        # relays waiting for a replica again, their own having failed them (`Relay._again`)
        self.rewaiting: set[asyncio.Task[None]] = set()


class Relay:
    """One request in flight to a replica (a `forwarder.upstream.ReplySink`)."""

    __slots__ = (
        "attempts",
        "body",
        "conn",
        "done",
        "headed",
        "headers",
        "heard_at",
        "held",
        "hold_s",
        "key_id",
        "overhead_s",
        "owner",
        "parts",
        "path",
        "plane",
        "replica",
        "reply",
        "rewait",
        "sent_at",
        "shape",
        "started_at",
        "status",
        "stream",
        "target",
        "timeout_s",
        "tried",
        "ttft_s",
        "waited_s",
        "watch",
    )

    def __init__(
        self,
        plane: Plane,
        target: Target,
        replica: TargetReplica,
        path: bytes,
        body: bytes,
        reply: Reply,
        key_id: str,
        stream: bool,
        started_at: float,
        waited_s: float,
        timeout_s: float,
        hold_s: float = 0.0,
        owner: bool = True,
    ) -> None:
        self.plane = plane
        self.target = target
        self.replica = replica
        self.path = path
        self.body = body
        self.reply = reply
        self.key_id = key_id
        self.stream = stream
        self.started_at = started_at  # perf_counter() when the request arrived
        self.waited_s = waited_s  # for a replica: a cold start or a full cap
        self.timeout_s = timeout_s or target.timeout_s or plane.timeout_s
        self.sent_at = started_at
        self.heard_at = 0.0  # perf_counter() of the send or of the last upstream event
        self.conn: Connection | None = None
        self.status = 0
        self.headers: Headers = []
        self.parts: list[bytes] | None = None  # a whole reply being gathered
        self.watch: StreamUsage | None = None
        self.headed = False  # on_head was called
        self.done = False
        self.ttft_s = -1.0
        self.overhead_s = -1.0
        self.held = True  # the replica is counted in flight for this request
        self.attempts = 0
        self.tried: set[str] | None = None
        # how long the request may wait for a replica again when its own fails before a reply
        # (its cold-start hold), and whether its caller owns the endpoint (`Forwarder.acquire`)
        self.hold_s = hold_s
        self.owner = owner
        self.rewait: asyncio.Task[None] | None = None
        # llama.cpp's completions and responses streams, reshaped into OpenAI's
        # (`forwarder/llama_cpp.py`); other replies pass through as their bytes
        self.shape: Shape | None = shape_for(target.framework, path, body)

    # sending
    def send(self) -> None:
        plane = self.plane
        address = self.replica.address
        conn = plane.pool.take(address)
        if conn is not None:
            self._send(conn)
            return
        assert plane.loop is not None, "Forwarder.start() was not awaited"
        task = plane.loop.create_task(plane.pool.connect(address))
        plane.connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Connection]) -> None:
        self.plane.connecting.discard(task)
        if task.cancelled():  # the api is shutting down
            self._stopped()
            return
        if task.exception() is not None:
            if not self.done:
                self._again(failed=True)
            return
        conn = task.result()
        if self.done:  # the client left while it connected
            conn.abort()
            return
        self._send(conn)

    def _send(self, conn: Connection) -> None:
        self.conn = conn
        self.heard_at = self.sent_at = perf_counter()
        self.plane.waiting.add(self)
        head = self.plane.pool.json_post_head(self.path, self.replica.id, self.replica.address)
        body = self.body
        if len(body) <= SMALL_BODY_BYTES:
            conn.send(b"%b%d\r\n\r\n%b" % (head, len(body), body), self)
        else:
            conn.send(b"%b%d\r\n\r\n" % (head, len(body)), self, body)

    def _again(self, *, failed: bool) -> None:
        """No reply byte came back: send the request again, to another replica if one is free,
        else once one is (`_wait_again`); give up after CONNECT_ATTEMPTS."""
        plane = self.plane
        plane.waiting.discard(self)
        plane.balancer.done(self.target, self.replica.id, not failed)
        self.held = False
        self.attempts += 1
        if self.attempts >= CONNECT_ATTEMPTS:
            why = f"no replica of {self.target.name!r} accepted the request"
            self._finish(502, ok=False, why=why)
            self.reply.on_failed(UpstreamError(why))
            return
        plane.retries.labels(self.target.name).inc()
        tried = self.tried = self.tried or set()
        tried.add(self.replica.id)
        replica = plane.balancer.try_acquire(self.target, tried)
        if replica is not None:
            self.replica, self.held = replica, True
            self.send()
            return
        assert plane.loop is not None
        self.reply.on_wait(True)
        avoid = frozenset(tried) if failed else frozenset()  # a stale pooled connection: same
        task = plane.loop.create_task(self._wait_again(avoid))
        self.rewait = task
        plane.rewaiting.add(task)
        task.add_done_callback(plane.rewaiting.discard)

    async def _wait_again(self, avoid: frozenset[str]) -> None:
        """Wait for a replica as a request does for a cold start (`Forwarder.acquire`, up to
        the request's hold), passing over those that failed it: the endpoint's last replica
        gone (killed; stopped by a roll, a restart or a scale-down) is replaced, and the
        request is answered by the replacement rather than refused. Its reply is told when
        the wait begins and ends (`Reply.on_wait`): a stream is kept alive meanwhile, a task
        shows PENDING."""
        try:
            target, replica, _ = await self.plane.forwarder.acquire(
                self.target, self.hold_s, self.owner, avoid
            )
        except ApplianceError as exc:
            if not self.done:
                self._finish(getattr(exc, "status_code", 503), ok=True, why=exc.message)
                self.reply.on_failed(exc)
            return
        except asyncio.CancelledError:
            self._stopped()  # the appliance stops (a client that left cancelled it first)
            raise
        finally:
            self.rewait = None
        if self.done:  # the client left while it waited
            self.plane.balancer.release(replica.id)
            return
        self.target, self.replica, self.held = target, replica, True
        self.reply.on_wait(False)
        self.send()

    # the reply (forwarder.upstream.ReplySink)
    def on_head(self, status: int, headers: Headers, length: int | None) -> None:
        self.heard_at = perf_counter()
        self.status = status
        self.headers = headers
        if status != 200:
            self.shape = None  # an error passes as the replica gave it
        small = length is not None and length <= WHOLE_BODY_MAX_BYTES
        if not self.stream and (small or self.shape is not None):
            self.parts = []  # a reply to reshape is read whole, whatever its length
            return
        mark = token_mark(self.target.framework, self.path) if self.stream else b""
        self.watch = StreamUsage(mark=mark)
        self.headed = True
        self._overhead(self.heard_at, perf_counter())
        if length is None or self.shape is not None:  # reshaped: a length of its own
            length = -1
        self.reply.on_head(status, headers, length)

    def on_body(self, data: bytes) -> None:
        self.heard_at = now = perf_counter()
        if self.parts is not None:
            self.parts.append(data)
            return
        if self.ttft_s < 0:
            self.ttft_s = now - self.started_at
        try:
            if self.shape is not None:
                data = self.shape.feed(data)
                if not data:
                    return
            assert self.watch is not None
            self.watch.feed(data)
            self.reply.on_body(data)
        except Exception as exc:  # whatever it is, the client is answered (`_unreadable`)
            self._unreadable(exc, complete=False)

    def on_reply(self, status: int, headers: Headers, body: bytes) -> None:
        large = len(body) > WHOLE_BODY_MAX_BYTES and (self.shape is None or status != 200)
        if self.stream or large:
            self.on_head(status, headers, len(body))
            if body:
                self.on_body(body)
            self.on_end()
            return
        self.status = status
        self._whole(status, headers, body)

    def on_end(self) -> None:
        if self.done:  # a reply that arrived whole and failed as its stream (`_unreadable`)
            return
        parts = self.parts
        if parts is not None:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._whole(self.status, self.headers, data)
            return
        try:
            if self.shape is not None:
                tail = self.shape.close()
                if tail:
                    assert self.watch is not None
                    self.watch.feed(tail)
                    self.reply.on_body(tail)
            self._finish(self.status, ok=healthy(self.status), usage=self._streamed())
            self.reply.on_end()
        except Exception as exc:  # whatever it is, the client is answered (`_unreadable`)
            self._unreadable(exc)

    def on_lost(self, reason: str) -> None:
        conn = self.conn
        if not self.status and conn is not None:
            # No reply at all. A pooled connection the replica had closed is no failure of
            # the replica: its other idle ones are likely stale too.
            if conn.reused:
                self.plane.pool.drop(self.replica.address)
            self._again(failed=not conn.reused)
            return
        self._fail(UpstreamError(self._cut_short(reason)))

    def _cut_short(self, reason: str) -> str:
        """Why a reply stopped half way: the endpoint's deletion, which drains and then stops
        its replicas, when the routing table says so; the replica's drain (a roll, a restart,
        a scale-down) when the table no longer routes to it; else the replica's fault."""
        now = self.plane.table.by_id.get(self.target.endpoint_id)
        if now is None or now.status == DELETING:
            return (
                f"endpoint {self.target.name!r} was deleted while this request ran: its replicas "
                "stop once their requests finish or a drain timeout passes"
            )
        replica_id = self.replica.id
        if all(r.id != replica_id for r in now.replicas):
            return (
                f"the replica of {self.target.name!r} serving this request was stopped while it "
                "ran: the endpoint took it out of service (an edit rolling it to a new "
                "generation, a restart, a scale-down, a failed health check), and it stops once "
                "its requests finish or a drain timeout passes; send the request again"
            )
        return f"the replica failed mid-reply: {reason}"

    def _whole(self, status: int, headers: Headers, body: bytes) -> None:
        try:
            if status == 200 and self.shape is not None:
                body = self.shape.whole(body)
            now = perf_counter()
            self._overhead(now, now)
            usage = usage_from_json(body) if status == 200 else None
            why = "" if status < 500 else body[:FAILURE_DETAIL_CHARS].decode("utf-8", "replace")
            self._finish(status, ok=healthy(status), usage=usage, now=now, why=why)
            self.reply.on_whole(status, headers, body)
        except Exception as exc:  # whatever it is, the client is answered (`_unreadable`)
            self._unreadable(exc)

    def _unreadable(self, exc: Exception, *, complete: bool = True) -> None:
        """The replica's reply could not be read or reshaped for its client: here
        (`forwarder/llama_cpp.py`) or by the reply's route (LLM Engine's shapes). A value
        nested deeper than JSON is read or written here does it (orjson writes 254 levels and
        reads 1,024, the standard library about 1,000), as may any reply the reshaping does
        not expect. The client gets a 502 that says so, an error event once its stream began,
        where the exception would have ended in the event loop's handler with no answer; the
        rest of a reply not complete is not read (its connection is dropped). The replica is
        not taken for unwell (its reply to one request: `REQUEST_ERRORS`); the failure is
        logged, and counted as a 502 unless the request was already counted."""
        if not complete and self.conn is not None:
            self.conn.abort()
        name = self.target.name
        why = f"the replica of {name!r} sent a reply that could not be read or reshaped here"
        error = UpstreamError(f"{why}: {type(exc).__name__}: {exc}")
        if self.done:  # counted as the replica's status: the route's shaping of it failed
            self.plane.failures.note(name, self.replica.id, error.status_code, error.message)
        else:
            self._finish(error.status_code, ok=True, usage=self._streamed(), why=error.message)
        self.reply.on_failed(error)

    def _overhead(self, ready_at: float, now: float) -> None:
        """The appliance's own time: before the send, less any wait for a replica, plus the
        time from when the reply was ready to go on (`ready_at`) until `now`."""
        before = self.sent_at - self.started_at - self.waited_s
        self.overhead_s = before + (now - ready_at)

    # ends
    def time_out(self) -> None:
        """The replica was silent for the timeout (`Forwarder` checks on one timer)."""
        if self.conn is not None:
            self.conn.abort()
        name = self.target.name
        self._fail(UpstreamError(f"replica of {name!r} did not answer in time", status_code=504))

    def shut_down(self) -> None:
        """The api stops with this request still running past its graceful wait: the client is
        told so (a stream by an error event) rather than cut off mid-reply."""
        if self.conn is not None:
            self.conn.abort()
        self._stopped()

    def _stopped(self) -> None:
        """The appliance stops under this request: its client is told so, and the replica is
        not blamed (no failure counted toward taking it out of rotation, none logged)."""
        if self.done:
            return
        exc = UpstreamError(SHUTTING_DOWN, status_code=503)
        self._finish(exc.status_code, ok=True, usage=self._streamed(), why=exc.message)
        self.reply.on_failed(exc)

    def cancel(self) -> None:
        """The client went away: drop the upstream request so the replica stops too."""
        if self.done:
            return
        if self.conn is not None:
            self.conn.abort()
        self._finish(CLIENT_CLOSED, ok=True, usage=self._streamed())
        if self.rewait is not None:
            self.rewait.cancel()

    def pause(self) -> None:
        """The client reads slower than the replica writes."""
        if self.conn is not None:
            self.conn.pause_reading()

    def resume(self) -> None:
        if self.conn is not None:
            self.conn.resume_reading()

    def _fail(self, exc: UpstreamError) -> None:
        if self.done:
            return
        self._finish(exc.status_code, ok=False, usage=self._streamed(), why=exc.message)
        self.reply.on_failed(exc)

    def _streamed(self) -> tuple[int, int] | None:
        """The usage of a 200 reply passed on as it came, however it ended: its own, or what
        its client was sent of a stream cut short (`StreamUsage.counted`)."""
        watch = self.watch
        if watch is None or self.status != 200:
            return None
        return watch.counted(len(self.body))

    def _finish(
        self,
        status: int,
        *,
        ok: bool,
        usage: tuple[int, int] | None = None,
        now: float | None = None,
        why: str = "",
    ) -> None:
        """Give the replica back and record the request, once; a 5xx is logged too (`why`:
        what went wrong, when known)."""
        if self.done:
            return
        self.done = True
        plane = self.plane
        if status >= 500:
            why = why or "the replica's own error reply"
            plane.failures.note(self.target.name, self.replica.id, status, why)
        plane.waiting.discard(self)
        if self.held:
            self.held = False
            plane.balancer.done(self.target, self.replica.id, ok)
        ttft_s = self.ttft_s if self.ttft_s >= 0 else None
        overhead_s = self.overhead_s if self.overhead_s >= 0 else None
        duration_s = (perf_counter() if now is None else now) - self.started_at
        plane.stats.add(
            self.target.name, self.key_id, status, duration_s, overhead_s, ttft_s, usage
        )
