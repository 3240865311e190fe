"""Forwards requests to replicas: least outstanding choice, a per-replica cap, cold-start hold,
retries on connection failures, ejection of failing replicas, bytes passed through.

One `Forwarder` per api process, created in the app's lifespan. Requests in flight per
replica are counted in this process's memory and, when the api runs several worker processes
(`api_workers`), also in memory shared by all of them (`forwarder/shared.py`), so choices and
caps see every worker's load. Failures and ejections are each process's own. The builder sees
the counts through Redis (`forwarder/live.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from appliance.errors import CapacityError, NoReadyReplicaError, UpstreamError
from forwarder.balance import Balancer
from forwarder.metrics import Metrics, inflight_rows
from forwarder.shared import SharedCounts
from forwarder.table import RoutingTable, Target, TargetReplica
from forwarder.usage import Ledger

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
POOL_SIZE = 2048
CONNECT_ATTEMPTS = 3  # tries of one request over its replicas when connections fail
RETRY_PAUSE_S = 0.05  # before trying the same replica again (no other one is left)
EJECT_AFTER_FAILURES = 3  # consecutive failures that take a replica out of rotation
PROBE_EVERY_S = 1.0  # health probe of an ejected replica
PROBE_TIMEOUT_S = 2.0
WAKE_EVERY_S = 1.0  # a waiting request re-checks the table at least this often
PASSED_HEADERS = frozenset({"content-type", "content-length"})


@dataclass(frozen=True)
class Limits:
    """The data plane's tunables, from Settings; each endpoint may override some."""

    timeout_s: float = 600.0  # idle time allowed between upstream bytes (and before headers)
    replica_max_concurrency: int = 256
    queue_wait_s: float = 5.0  # wait for a replica under its cap before a 503


@dataclass
class Upstream:
    """A replica's reply whose body is still to be read. `close()` exactly once."""

    status: int
    headers: list[tuple[bytes, bytes]]
    route: Target
    replica_id: str
    response: aiohttp.ClientResponse
    waited_s: float  # cold-start and queue waits before it was sent
    sent_at: float  # perf_counter when handed to the connection
    headers_at: float  # perf_counter when the reply's headers arrived
    _done: Callable[[Upstream, bool], None]
    _closed: bool = False

    @property
    def content_length(self) -> int | None:
        return self.response.content_length

    async def read(self) -> bytes:
        """The whole body; a failure here is a 502, since nothing reached the client yet."""
        try:
            return await self.response.read()
        except aiohttp.SocketTimeoutError as exc:
            raise UpstreamError("the replica did not answer in time", status_code=504) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the replica failed mid-reply: {exc}") from exc

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, never re-chunked."""
        content = self.response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except aiohttp.SocketTimeoutError as exc:
            raise UpstreamError("the replica stopped sending in time", status_code=504) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"the replica failed mid-reply: {exc}") from exc

    def close(self) -> None:
        """Release the connection (or drop it when the body was not read to its end, which
        is how an abandoned request is cancelled at the replica) and count the request done."""
        if self._closed:
            return
        self._closed = True
        ok = self.status < 500
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()
        self._done(self, ok)


@dataclass
class Forwarder:
    """The data plane of one api process."""

    limits: Limits = field(default_factory=Limits)
    table: RoutingTable = field(default_factory=RoutingTable.empty)
    on_demand: Callable[[Target], None] = lambda route: None
    inflight: dict[str, int] = field(default_factory=dict)  # replica id -> this process's
    shared: SharedCounts | None = None  # every api worker's counts, when there are several
    worker: int | None = None  # this process's index among several api workers
    endpoint_of: dict[str, str] = field(default_factory=dict)  # replica id -> endpoint name
    failures: dict[str, int] = field(default_factory=dict)  # replica id -> consecutive
    ejected: set[str] = field(default_factory=set)
    demand: dict[str, float] = field(default_factory=dict)  # endpoint id -> when it wanted one
    last_request: dict[str, float] = field(default_factory=dict)  # endpoint id -> time.time()
    ledger: Ledger = field(default_factory=Ledger)
    loaded_at: float = 0.0  # time.monotonic() of the last reload a route miss caused
    metrics: Metrics = field(init=False)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    balancer: Balancer = field(init=False)  # the choice of replica, compiled
    _freed: asyncio.Event = field(default_factory=asyncio.Event)
    _session: aiohttp.ClientSession | None = None
    _timeouts: dict[float, aiohttp.ClientTimeout] = field(default_factory=dict)
    _probes: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.balancer = Balancer(self)
        self.metrics = Metrics(lambda: inflight_rows(self.inflight_totals(), self._names()))

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=POOL_SIZE, limit_per_host=0, ttl_dns_cache=60, enable_cleanup_closed=False
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout(self.limits.timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        for probe in list(self._probes):
            probe.cancel()
        if self._session is not None:
            await self._session.close()

    def update(self, table: RoutingTable) -> None:
        """Install a new routing table and wake requests waiting for a replica."""
        self.table = table
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=CONNECT_TIMEOUT_S, sock_read=seconds
            )
            self._timeouts[seconds] = timeout
        return timeout

    def live_replicas(self, route: Target) -> list[TargetReplica]:
        """The route's ready replicas that are not ejected, from the current table."""
        current = self.table.by_id.get(route.endpoint_id, route)
        ejected = self.ejected
        if not ejected:
            return list(current.replicas)
        return [r for r in current.replicas if r.id not in ejected]

    def _note_demand(self, route: Target) -> None:
        now = time.time()
        if now - self.demand.get(route.endpoint_id, 0.0) >= 1.0:
            self.demand[route.endpoint_id] = now
            try:
                self.on_demand(route)
            except Exception:
                logger.exception("demand hook failed")

    async def _wait_change(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=min(timeout_s, WAKE_EVERY_S))

    async def _acquire(
        self, route: Target, hold_s: float, tried: set[str]
    ) -> tuple[Target, TargetReplica, float]:
        """A replica under its cap, counted in flight; waits for a cold start and for a slot.
        Returns the route as now in the table, the replica and the seconds spent waiting."""
        started = time.monotonic()
        cold_until = started + hold_s
        queue_until: float | None = None
        waited_cold = 0.0
        while True:
            current = self.table.by_id.get(route.endpoint_id)
            if current is None:
                raise NoReadyReplicaError(f"endpoint {route.name!r} was deleted")
            live = self.live_replicas(current)
            if not live:
                self._note_demand(current)
                left = cold_until - time.monotonic()
                if left <= 0:
                    raise NoReadyReplicaError(
                        f"endpoint {route.name!r} has no ready replica yet; retry shortly",
                        retry_after_s=10,
                    )
                began = time.monotonic()
                await self._wait_change(left)
                waited_cold += time.monotonic() - began
                continue
            fresh = [r for r in live if r.id not in tried] if tried else live
            best, cap = self.balancer.take(current, fresh or live)
            if best is not None:
                waited = time.monotonic() - started
                if waited_cold:
                    self.metrics.cold_wait.labels(current.name).observe(waited_cold)
                if waited - waited_cold > 0.001:
                    self.metrics.queue_wait.labels(current.name).observe(waited - waited_cold)
                return current, best, waited
            now = time.monotonic()
            queue_until = queue_until or now + self.limits.queue_wait_s
            if now >= queue_until:
                raise CapacityError(
                    f"every replica of {route.name!r} is at its limit of {cap} requests",
                    retry_after_s=1,
                )
            await self._wait_slot(queue_until - now)

    def _names(self) -> dict[str, str]:
        """Replica id -> endpoint name, for every replica in the table or served lately."""
        names = dict(self.endpoint_of)
        for route in self.table.by_id.values():
            names.update((r.id, route.name) for r in route.replicas)
        return names

    def inflight_totals(self) -> dict[str, int]:
        """Replica id -> requests in flight from every api worker, for replicas with some."""
        if self.shared is None:
            return dict(self.inflight)
        ids = set(self.endpoint_of)
        for route in self.table.by_id.values():
            ids.update(r.id for r in route.replicas)
        return {rid: n for rid in ids if (n := self.shared.total(rid)) > 0}

    async def _wait_slot(self, timeout_s: float) -> None:
        self.balancer.slot_waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), timeout=min(timeout_s, WAKE_EVERY_S))
        finally:
            self.balancer.slot_waiters -= 1

    def slot_freed(self) -> None:
        """Wake the requests waiting for a replica under its cap (`Balancer.release`)."""
        self._freed.set()
        self._freed = asyncio.Event()

    def _finished(self, upstream: Upstream, ok: bool) -> None:
        self.balancer.done(upstream.route, upstream.replica_id, ok)

    def failed(self, route: Target, replica_id: str) -> None:
        """A request to the replica failed; after EJECT_AFTER_FAILURES in a row it is taken
        out of rotation until its health probe passes."""
        count = self.failures.get(replica_id, 0) + 1
        self.failures[replica_id] = count
        if count >= EJECT_AFTER_FAILURES and replica_id not in self.ejected:
            replica = next((r for r in route.replicas if r.id == replica_id), None)
            if replica is None:
                return
            logger.warning(
                "replica %s failed %d times in a row; out of rotation", replica_id, count
            )
            self.ejected.add(replica_id)
            self.metrics.ejections.labels(route.name).inc()
            probe = asyncio.get_running_loop().create_task(self._probe(route, replica))
            self._probes.add(probe)
            probe.add_done_callback(self._probes.discard)

    async def _probe(self, route: Target, replica: TargetReplica) -> None:
        """Keep an ejected replica out until its health route answers 200 (or it is gone)."""
        assert self._session is not None
        try:
            while True:
                await asyncio.sleep(PROBE_EVERY_S)
                current = self.table.by_id.get(route.endpoint_id)
                if current is None or all(r.id != replica.id for r in current.replicas):
                    return
                try:
                    async with self._session.get(
                        replica.address + current.health_route,
                        timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                    ) as reply:
                        if reply.status == 200:
                            logger.info("replica %s is healthy again; back in rotation", replica.id)
                            return
                except (aiohttp.ClientError, TimeoutError):
                    continue
        finally:
            self.ejected.discard(replica.id)
            self.failures.pop(replica.id, None)
            self._wake()

    def ready_now(self, route: Target) -> bool:
        return bool(self.live_replicas(route))

    async def open(
        self,
        route: Target,
        path: str,
        body: bytes,
        *,
        hold_s: float,
        content_type: str = "application/json",
        timeout_s: float | None = None,
    ) -> Upstream:
        """Send the request to a replica and return once its reply's headers arrived.

        Connection failures are retried on another replica (the same one when it is the only
        one) up to CONNECT_ATTEMPTS times: nothing has reached the client yet.
        """
        session = self._session
        assert session is not None, "Forwarder.start() was not awaited"
        self.last_request[route.endpoint_id] = time.time()
        timeout = self._timeout(timeout_s or route.timeout_s or self.limits.timeout_s)
        headers = {"content-type": content_type}
        tried: set[str] = set()
        waited = 0.0
        for attempt in range(CONNECT_ATTEMPTS):
            route, replica, waited_now = await self._acquire(route, hold_s, tried)
            waited += waited_now
            sent_at = time.perf_counter()
            try:
                response = await session.post(
                    replica.address + path, data=body, headers=headers, timeout=timeout
                )
            except aiohttp.SocketTimeoutError as exc:
                self.balancer.release(replica.id)
                self.failed(route, replica.id)
                raise UpstreamError(
                    f"replica of {route.name!r} did not answer in time", status_code=504
                ) from exc
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                self.balancer.release(replica.id)
                self.failed(route, replica.id)
                logger.warning("replica %s: connection failed: %r", replica.id, exc)
                if replica.id in tried:
                    await asyncio.sleep(RETRY_PAUSE_S)
                tried.add(replica.id)
                if attempt + 1 < CONNECT_ATTEMPTS:
                    self.metrics.retries.labels(route.name).inc()
                continue
            except BaseException:
                self.balancer.release(replica.id)
                raise
            return Upstream(
                status=response.status,
                headers=[
                    (k.lower().encode(), v.encode())
                    for k, v in response.headers.items()
                    if k.lower() in PASSED_HEADERS
                ],
                route=route,
                replica_id=replica.id,
                response=response,
                waited_s=waited,
                sent_at=sent_at,
                headers_at=time.perf_counter(),
                _done=self._finished,
            )
        raise UpstreamError(f"no replica of {route.name!r} accepted the connection")

    def record(
        self,
        route: Target,
        key_id: str,
        code: int,
        *,
        duration_s: float,
        overhead_s: float | None = None,
        ttft_s: float | None = None,
        usage: tuple[int, int] | None = None,
    ) -> None:
        """Account one finished request: metrics, and so usage for the key and endpoint."""
        self.metrics.stats.add(route.name, key_id, code, duration_s, overhead_s, ttft_s, usage)


@dataclass
class UpstreamReply:
    """An upstream response whose body is still to be read (for callers outside the api)."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


async def forward(
    forwarder: Forwarder, route: Target, path: str, body: bytes, content_type: str, *, hold_s: float
) -> UpstreamReply:
    """`Forwarder.open` for callers that only want status, headers and a body iterator."""
    upstream = await forwarder.open(route, path, body, hold_s=hold_s, content_type=content_type)

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.chunks():
                yield chunk
        finally:
            upstream.close()

    return UpstreamReply(
        status=upstream.status,
        headers={k.decode(): v.decode() for k, v in upstream.headers},
        body=relay(),
    )
