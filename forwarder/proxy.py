"""Forwards requests to replicas: least outstanding choice, cold-start hold, bytes passed through.

One `Forwarder` per api process, created in the app's lifespan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp

from appliance.errors import NoReadyReplicaError, UpstreamError
from forwarder.routing import ReplicaRoute, Route, RoutingTable

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0
POOL_SIZE = 1024
CHUNK_BYTES = 64 * 1024
PASSED_HEADERS = ("content-type",)


@dataclass
class UpstreamReply:
    """An upstream response whose body is still to be read, and the replica it came from."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]


@dataclass
class Forwarder:
    """The data plane of one api process."""

    table: RoutingTable = field(default_factory=RoutingTable.empty)
    on_demand: Callable[[Route], None] = lambda route: None
    inflight: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=POOL_SIZE, limit_per_host=0, ttl_dns_cache=60)
        timeout = aiohttp.ClientTimeout(
            total=None, connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def update(self, table: RoutingTable) -> None:
        """Install a new routing table and wake requests waiting for a replica."""
        self.table = table
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_ready(self, route: Route, timeout_s: float) -> Route:
        """The route once it has a ready replica; NoReadyReplicaError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.table.by_id.get(route.endpoint_id)
            if current is None:
                raise NoReadyReplicaError(f"endpoint {route.name!r} was deleted")
            if current.replicas:
                return current
            self.on_demand(current)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoReadyReplicaError(
                    f"endpoint {route.name!r} has no ready replica; it is starting, retry shortly"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 1.0))

    def _pick(self, route: Route, exclude: set[str]) -> ReplicaRoute | None:
        candidates = [r for r in route.replicas if r.id not in exclude]
        if not candidates:
            return None
        return min(candidates, key=lambda r: self.inflight.get(r.id, 0))

    async def forward(
        self, route: Route, path: str, body: bytes, content_type: str, *, hold_s: float
    ) -> UpstreamReply:
        """Send the request to a ready replica; retry elsewhere if the connection fails."""
        assert self._session is not None
        tried: set[str] = set()
        while True:
            route = await self._wait_ready(route, hold_s)
            replica = self._pick(route, tried)
            if replica is None:
                raise UpstreamError(
                    f"no replica of {route.name!r} accepted the connection", status_code=503
                )
            tried.add(replica.id)
            self.inflight[replica.id] = self.inflight.get(replica.id, 0) + 1
            try:
                response = await self._session.post(
                    replica.address + path, data=body, headers={"content-type": content_type}
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                self._done(replica.id)
                logger.warning("replica %s refused the connection: %s", replica.id, exc)
                continue
            return UpstreamReply(
                status=response.status,
                headers={k: v for k, v in response.headers.items() if k.lower() in PASSED_HEADERS},
                body=self._relay(response, replica.id),
            )

    def _done(self, replica_id: str) -> None:
        left = self.inflight.get(replica_id, 1) - 1
        if left > 0:
            self.inflight[replica_id] = left
        else:
            self.inflight.pop(replica_id, None)

    async def _relay(
        self, response: aiohttp.ClientResponse, replica_id: str
    ) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"replica failed mid-response: {exc}") from exc
        finally:
            response.release()
            self._done(replica_id)
