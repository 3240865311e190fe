"""The data plane of one process (the api's, or the worker's): the routing table, the choice of
a replica with its waits (a cold start, a full cap), ejection of failing replicas and their
health probes, pooled connections to replicas, every relay in flight (`forwarder/relay.py`)
and its timeout, and the request metrics and usage ledger.

One `Forwarder` per process, made at start. Requests in flight per replica are counted in this
process's memory and, when the api runs several worker processes (`api_workers`), also in
memory shared by all of them (`forwarder/shared.py`), so choices and caps see every worker's
load. Failures and ejections are each process's own. The builder sees the counts through
Redis (`forwarder/live.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from appliance.errors import (
    ApplianceError,
    BadRequestError,
    CapacityError,
    EndpointDownError,
    NoReadyReplicaError,
)
from forwarder.balance import Balancer
from forwarder.metrics import Metrics, inflight_rows
from forwarder.relay import Headers, Plane, Relay
from forwarder.shared import SharedCounts
from forwarder.table import RoutingTable, Target, TargetReplica, check_coming, waiting_message
from forwarder.upstream import UpstreamPool
from forwarder.usage import Ledger

if TYPE_CHECKING:
    from appliance.settings import Settings

logger = logging.getLogger(__name__)


class ReplyTooLargeError(BadRequestError):
    """A reply for the worker longer than it keeps: no retry would make it shorter."""


EJECT_AFTER_FAILURES = 3  # consecutive failures that take a replica out of rotation
PROBE_EVERY_S = 1.0  # health probe of an ejected replica
PROBE_TIMEOUT_S = 2.0
WAKE_EVERY_S = 1.0  # a waiting request re-checks the table at least this often
# how long a request waits for other replicas than those that failed it before it tries them
# again: long enough for the builder to see a replica gone and the routes to drop it
AVOID_FAILED_S = 5.0
TIMEOUT_CHECK_EVERY_S = 0.25  # upstream timeouts are checked for every relay at once


@dataclass(frozen=True)
class Limits:
    """The data plane's tunables, from Settings; each endpoint may override some."""

    timeout_s: float = 600.0  # idle time allowed between upstream bytes (and before headers)
    replica_max_concurrency: int = 256
    queue_wait_s: float = 5.0  # wait for a replica under its cap before a 503

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        """The install's: the api's data plane and the worker's (async tasks, batches) alike."""
        return cls(
            timeout_s=settings.upstream_timeout_s,
            replica_max_concurrency=settings.replica_max_concurrency,
            queue_wait_s=settings.queue_wait_s,
        )


@dataclass
class Forwarder:
    """The data plane of one process."""

    limits: Limits = field(default_factory=Limits)
    table: RoutingTable = field(default_factory=RoutingTable.empty)
    on_demand: Callable[[Target], None] = lambda target: None
    inflight: dict[str, int] = field(default_factory=dict)  # replica id -> this process's
    shared: SharedCounts | None = None  # every api worker's counts, when there are several
    worker: int | None = None  # this process's index among several api workers
    endpoint_of: dict[str, str] = field(default_factory=dict)  # replica id -> endpoint name
    failures: dict[str, int] = field(default_factory=dict)  # replica id -> consecutive
    ejected: set[str] = field(default_factory=set)
    demand: dict[str, float] = field(default_factory=dict)  # endpoint id -> when it wanted one
    last_request: dict[str, float] = field(default_factory=dict)  # endpoint id -> time.time()
    ledger: Ledger = field(default_factory=Ledger)
    loaded_at: float = 0.0  # time.monotonic() when the last reload a lookup miss caused began
    reloading: asyncio.Future[None] | None = None  # that reload, while it runs
    table_read_at: float = 0.0  # time.monotonic() when the table installed began to be read
    pool: UpstreamPool = field(default_factory=UpstreamPool)
    metrics: Metrics = field(init=False)
    balancer: Balancer = field(init=False)  # the choice of replica, compiled
    plane: Plane = field(init=False)  # what the relays read, compiled
    loop: asyncio.AbstractEventLoop = field(init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _freed: asyncio.Event = field(default_factory=asyncio.Event)
    _probes: set[asyncio.Task[None]] = field(default_factory=set)
    _checker: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.balancer = Balancer(self)
        self.metrics = Metrics(lambda: inflight_rows(self.inflight_totals(), self._names()))
        self.plane = Plane(self)

    async def start(self) -> None:
        self.loop = self.plane.loop = asyncio.get_running_loop()
        self._checker = self.loop.call_later(TIMEOUT_CHECK_EVERY_S, self._check_timeouts)

    async def close(self) -> None:
        """At the api's stop, after uvicorn's graceful wait: the requests still running are
        told so (`Relay.shut_down`), then the connections close."""
        if self._checker is not None:
            self._checker.cancel()
        for relay in list(self.plane.waiting):
            relay.shut_down()
        for task in [*self._probes, *self.plane.connecting, *self.plane.rewaiting]:
            task.cancel()
        self.pool.close()

    def _check_timeouts(self) -> None:
        """One timer for every relay in flight instead of one per request."""
        now = time.perf_counter()  # the clock of Relay.heard_at
        late = [r for r in self.plane.waiting if now - r.heard_at >= r.timeout_s]
        for relay in late:
            relay.time_out()
        self._checker = self.loop.call_later(TIMEOUT_CHECK_EVERY_S, self._check_timeouts)

    def update(self, table: RoutingTable, read_at: float = 0.0) -> None:
        """Install a new routing table and wake requests waiting for a replica. `read_at`
        (time.monotonic() when its read began): a table read before the one installed is
        older than it, and is dropped (two reloads may end in either order)."""
        if read_at and read_at < self.table_read_at:
            return
        self.table_read_at = max(read_at, self.table_read_at)
        self.table = self.plane.table = table
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def live_replicas(self, target: Target) -> list[TargetReplica]:
        """The endpoint's ready replicas that are not ejected, from the current table."""
        current = self.table.by_id.get(target.endpoint_id, target)
        ejected = self.ejected
        if not ejected:
            return list(current.replicas)
        return [r for r in current.replicas if r.id not in ejected]

    def _note_demand(self, target: Target) -> None:
        now = time.time()
        if now - self.demand.get(target.endpoint_id, 0.0) >= 1.0:
            self.demand[target.endpoint_id] = now
            try:
                self.on_demand(target)
            except Exception:
                logger.exception("demand hook failed")

    async def _wait_change(self, timeout_s: float) -> None:
        await woken(self._changed, min(timeout_s, WAKE_EVERY_S))

    async def acquire(
        self,
        target: Target,
        hold_s: float,
        owner: bool = True,
        avoid: frozenset[str] = frozenset(),
    ) -> tuple[Target, TargetReplica, float]:
        """A replica under its cap, counted in flight; waits up to `hold_s` for a cold start
        and `queue_wait_s` for a slot. Returns the endpoint as now in the table, the replica
        and the seconds spent waiting. The caller reports the outcome with `Balancer.done`.
        An endpoint that will get no replica by waiting (`table.check_coming`: it failed to
        start, it is being deleted, it was deleted) ends the wait with EndpointDownError as
        soon as a table that says so is installed (`owner`: as `check_coming` words it).
        `avoid`: replicas that failed this request (`Relay`: gone, most likely, before the
        routes said so), passed over for AVOID_FAILED_S; with no other, it waits as for a
        cold start, for the replica that replaces them."""
        started = time.monotonic()
        cold_until = started + hold_s
        avoid_until = started + AVOID_FAILED_S
        queue_until: float | None = None
        waited_cold = 0.0
        while True:
            current = self.table.by_id.get(target.endpoint_id)
            if current is None:
                raise EndpointDownError(f"endpoint {target.name!r} was deleted")
            live = self.live_replicas(current)
            if avoid and time.monotonic() < avoid_until:
                live = [r for r in live if r.id not in avoid]
            if not live:
                check_coming(current, owner)
                self._note_demand(current)
                left = cold_until - time.monotonic()
                if left <= 0:
                    waited = time.monotonic() - started
                    raise NoReadyReplicaError(
                        waiting_message(current, waited, owner), retry_after_s=10
                    )
                began = time.monotonic()
                await self._wait_change(left)
                waited_cold += time.monotonic() - began
                continue
            self.last_request[current.endpoint_id] = time.time()
            best, cap = self.balancer.take(current, live)
            if best is not None:
                self._observe_waits(current, time.monotonic() - started, waited_cold)
                return current, best, time.monotonic() - started
            now = time.monotonic()
            queue_until = queue_until or now + self.limits.queue_wait_s
            if now >= queue_until:
                raise CapacityError(
                    f"every replica of {target.name!r} is at its limit of {cap} requests",
                    retry_after_s=1,
                )
            await self._wait_slot(queue_until - now)

    def _observe_waits(self, target: Target, waited: float, waited_cold: float) -> None:
        if waited_cold:
            self.metrics.cold_wait.labels(target.name).observe(waited_cold)
        if waited - waited_cold > 0.001:
            self.metrics.queue_wait.labels(target.name).observe(waited - waited_cold)

    def _names(self) -> dict[str, str]:
        """Replica id -> endpoint name, for every replica in the table or served lately."""
        names = dict(self.endpoint_of)
        for target in self.table.by_id.values():
            names.update((r.id, target.name) for r in target.replicas)
        return names

    def inflight_totals(self) -> dict[str, int]:
        """Replica id -> requests in flight from every api worker, for replicas with some."""
        if self.shared is None:
            return dict(self.inflight)
        ids = set(self.endpoint_of)
        for target in self.table.by_id.values():
            ids.update(r.id for r in target.replicas)
        return {rid: n for rid in ids if (n := self.shared.total(rid)) > 0}

    async def _wait_slot(self, timeout_s: float) -> None:
        self.balancer.slot_waiters += 1
        try:
            await woken(self._freed, min(timeout_s, WAKE_EVERY_S))
        finally:
            self.balancer.slot_waiters -= 1

    def slot_freed(self) -> None:
        """Wake the requests waiting for a replica under its cap (`Balancer.release`)."""
        self._freed.set()
        self._freed = asyncio.Event()

    def failed(self, target: Target, replica_id: str) -> None:
        """A request to the replica failed; after EJECT_AFTER_FAILURES in a row it is taken
        out of rotation until its health probe passes."""
        count = self.failures.get(replica_id, 0) + 1
        self.failures[replica_id] = count
        if count >= EJECT_AFTER_FAILURES and replica_id not in self.ejected:
            replica = next((r for r in target.replicas if r.id == replica_id), None)
            if replica is None:
                return
            logger.warning(
                "replica %s failed %d times in a row; out of rotation", replica_id, count
            )
            self.ejected.add(replica_id)
            self.metrics.ejections.labels(target.name).inc()
            probe = asyncio.get_running_loop().create_task(self._probe(target, replica))
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)

    async def _probe(self, target: Target, replica: TargetReplica) -> None:
        """Keep an ejected replica out until its health route answers 200 (or it is gone)."""
        try:
            while True:
                await asyncio.sleep(PROBE_EVERY_S)
                current = self.table.by_id.get(target.endpoint_id)
                replicas = current.replicas if current is not None else ()
                # at its address now: a replica restarted on another port is routed there
                now = next((r for r in replicas if r.id == replica.id), None)
                if current is None or now is None:
                    return
                if await healthy(now.address, current.health_route):
                    logger.info("replica %s is healthy again; back in rotation", replica.id)
                    return
        finally:
            self.ejected.discard(replica.id)
            self.failures.pop(replica.id, None)
            self._wake()

    def ready_now(self, target: Target) -> bool:
        return bool(self.live_replicas(target))

    async def fetch(
        self,
        target: Target,
        replica: TargetReplica,
        path: str,
        body: bytes,
        *,
        started: float,
        waited: float,
        timeout_s: float = 0.0,
        key_id: str = "-",
        max_bytes: int = 0,
        hold_s: float = 0.0,
        owner: bool = True,
        on_wait: Callable[[bool], None] | None = None,
    ) -> tuple[int, bytes]:
        """The replica's status and whole reply for a request no client waits on (the
        worker's tasks), once `acquire` gave `target` (as it returned it) and `replica`;
        `started` is perf_counter() before that. The same relay, metrics and usage as the
        api's requests. A reply passing `max_bytes` (0: no bound) raises ReplyTooLargeError
        and drops the replica's connection, so it stops generating. `hold_s`, `owner`: as
        `acquire`'s, for a wait for another replica when this one fails before it replies;
        `on_wait` is told when that wait begins (True) and when a replica takes the request
        again (False)."""
        collected = Collected(self.loop.create_future(), max_bytes, on_wait)
        relay = Relay(
            self.plane, target, replica, path.encode(), body, collected, key_id,
            False, started, waited, timeout_s, hold_s, owner,
        )  # fmt: skip
        relay.send()
        try:
            return await collected.future
        except (asyncio.CancelledError, ReplyTooLargeError):
            relay.cancel()
            raise


class Collected:
    """A relayed reply gathered whole into a future (`Forwarder.fetch`), up to `max_bytes`
    (0: no bound); past it the future fails and what came is dropped. A wait for another
    replica goes to `waiting`, when given."""

    def __init__(
        self,
        future: asyncio.Future[tuple[int, bytes]],
        max_bytes: int = 0,
        waiting: Callable[[bool], None] | None = None,
    ) -> None:
        self.future = future
        self.status = 0
        self.parts: list[bytes] = []
        self.size = 0
        self.max_bytes = max_bytes
        self.waiting = waiting

    def _too_large(self, size: int) -> bool:
        if not self.max_bytes or size <= self.max_bytes:
            return False
        self.parts = []
        if not self.future.done():
            self.future.set_exception(
                ReplyTooLargeError(
                    f"the replica's reply passed {self.max_bytes} bytes, the most a task keeps "
                    "(APPLIANCE_TASK_RESULT_MAX_BYTES); ask for fewer tokens, sequences or "
                    "logprobs"
                )
            )
        return True

    def on_head(self, status: int, headers: Headers, length: int) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if not self.future.done() and not self._too_large(self.size):
            self.parts.append(data)

    def on_end(self) -> None:
        if not self.future.done():
            self.future.set_result((self.status, b"".join(self.parts)))

    def on_whole(self, status: int, headers: Headers, body: bytes) -> None:
        if not self.future.done() and not self._too_large(len(body)):
            self.future.set_result((status, body))

    def on_failed(self, exc: ApplianceError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def on_wait(self, waiting: bool) -> None:
        if self.waiting is not None and not self.future.done():
            self.waiting(waiting)


async def woken(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until `event` is set or `timeout_s` passed. Not `asyncio.wait_for`: on Python 3.11
    it drops a cancel that lands as the event is set (it returns the event's result instead),
    and a request waiting for a replica would wait on through the api's stop, never told the
    api stops (`Core.shut_down`), or on after its client went; the worker's job taker and
    helpers wait with it too (`forwarder/worker/runner.py`)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


async def healthy(address: str, path: str) -> bool:
    """Whether GET `path` on the replica answers 200 within PROBE_TIMEOUT_S."""
    parts = urlsplit(address)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
                    "connection: close\r\n\r\n".encode()
                )
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status_line.split(b" ", 2)[1:2] == [b"200"]
