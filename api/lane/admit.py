"""What the fast lane serves: `FastLane.admit` takes each request `api/lane/front.py` parsed
and, without awaiting anything, starts an `api/lane/exchange.Exchange` for it or declines it.

A request is admitted only on the common path: a key found valid before (verified again on
the spot when its cached entry is over a second old) with the `inference` scope and no rate
limits, a JSON body naming an endpoint the key may call, a ready replica under its cap.
Everything else (a key never seen, limits to count in Redis, a cold start to wait for, a
queue for a slot, CORS, any 4xx) is declined, and `api/lane/front.py` hands the untouched
request to the general path (`api/routes/openai.py`), which answers it as always.
Once sent, a failure before any reply byte (a stale pooled connection, a replica that died) is
handed over too, so the general path retries it on another replica.

Both paths share the forwarder's counters, routing table, ejections and metrics.
"""

from __future__ import annotations

import asyncio
import http
import json
import time
from json.scanner import make_scanner
from typing import TYPE_CHECKING, Any, Protocol, cast

from api.callers import known_caller, visible
from api.deps import parse_key
from api.lane.exchange import Exchange
from api.routes.openai import UPSTREAM_PATHS
from forwarder.upstream import Connection, UpstreamPool

if TYPE_CHECKING:
    from api.deps import AppState

HOT_PATHS = {ours.encode(): theirs.encode() for ours, theirs in UPSTREAM_PATHS.items()}
STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
# json.loads(bytes) would first guess the encoding, a third of its cost; and the scanner that
# JSONDecoder.raw_decode wraps, called directly, saves an interpreted frame
# (typeshed types its argument as a scanner; it reads a decoder's settings, as json does)
_scan = make_scanner(cast(Any, json.JSONDecoder()))
MAX_PREFIXES = 256  # reply heads kept (status and content type vary little)
TIMEOUT_CHECK_EVERY_S = 0.25  # upstream timeouts are checked for all exchanges at once


class Head:
    """What the fast lane needs from a request head (see `api/lane/front.parse_head`). A plain
    class: compiled, it is a native one, made without a call into the interpreter."""

    __slots__ = ("api_key", "authorization", "keep_alive", "length", "origin", "upstream_path")

    def __init__(
        self,
        upstream_path: bytes,
        length: int,
        authorization: str,
        api_key: str | None,
        origin: bool,
        keep_alive: bool,
    ) -> None:
        self.upstream_path = upstream_path
        self.length = length
        self.authorization = authorization
        self.api_key = api_key
        self.origin = origin
        self.keep_alive = keep_alive


class Client(Protocol):
    """The client connection an exchange answers on (`api/lane/front.FrontProtocol`)."""

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
        self.balancer = state.forwarder.balancer
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
        now = time.perf_counter()  # the clock of Exchange.heard_at
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
        caller = known_caller(self.state, key) if key else None
        if caller is None or (head.origin and self.cors):
            return None
        if not caller.is_admin and "inference" not in caller.scopes:
            return None
        limits = caller.limits
        if limits.requests_per_minute or limits.max_concurrent_requests:
            return None
        if limits.max_tokens_per_request:
            return None
        try:
            text = body.decode()
            payload, end = _scan(text, 0)
        except (StopIteration, ValueError):  # no JSON value at 0; bad JSON or UTF-8
            return None
        if end != len(text) and text[end:].strip():
            return None
        if not isinstance(payload, dict) or not isinstance(model := payload.get("model"), str):
            return None
        route = visible(self.forwarder.table.by_name.get(model), caller)
        if route is None:
            return None
        replica = self.balancer.try_acquire(route)
        if replica is None:
            return None
        exchange = Exchange(self, client, route, replica, caller.key_id, head.keep_alive)
        exchange.begin(head.upstream_path, body, stream=payload.get("stream") is True)
        return exchange
