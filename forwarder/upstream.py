"""The data plane's HTTP/1.1 client (`forwarder/relay.py` sends every request through it):
keep-alive connections to replicas on asyncio protocols, replies parsed by httptools, every
event a plain callback.

A request is one `transport.write` and its reply arrives as `on_head`, `on_body`, `on_end`
calls on a `ReplySink`; there is no task, future or coroutine per request (aiohttp's request
and response objects, futures and stream readers cost more CPU than the whole rest of a
proxied request). New connections are the one thing awaited (`UpstreamPool.connect`), and a
busy api reuses pooled ones.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING, Protocol, cast
from urllib.parse import urlsplit

import httptools

from appliance.install import replica_key
from forwarder.scan import SP, digits, field, named, starts

if TYPE_CHECKING:  # only annotations name it (strings at run time); compiled, a native int
    from mypy_extensions import i64

IDLE_MAX_S = 4.0  # under the 5 s keep-alive of uvicorn-based servers: never reuse a closing one
IDLE_PER_ADDRESS = 512
MAX_HEADS = 4096  # request heads kept (paths x replicas)
CONNECT_TIMEOUT_S = 5.0
# passed on to the client; the length is framing, reported apart (`length`) and written anew
PASSED_HEADERS = frozenset({b"content-type"})


class ReplySink(Protocol):
    """What a connection reports one reply to."""

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        """Status and the passed headers (lower-case names); `length` from Content-Length."""

    def on_body(self, data: bytes) -> None:
        """Body bytes as they arrive (de-chunked)."""

    def on_end(self) -> None:
        """The reply is complete."""

    def on_reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A whole reply that arrived at once (instead of on_head, on_body, on_end)."""

    def on_lost(self, reason: str) -> None:
        """The connection failed before the reply was complete."""


class Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; carries one request at a time."""

    def __init__(self, pool: UpstreamPool, address: str) -> None:
        self.pool = pool
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ReplySink | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.head_seen = False
        self.until_close = True
        self.reused = False  # had carried a request before this one
        self.between = True  # the parser holds no part of a reply
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, data: bytes, sink: ReplySink, more: bytes = b"") -> None:
        """Write one request (`data`, then `more` when it is not empty); its reply goes to
        `sink`. A connection the replica closed before the write (it accepted, then hung up
        before this send: a proxy in front of a replica that is gone does so) reports the
        loss to `sink` at once, so the request goes elsewhere."""
        self.sink = sink
        self.headers = []
        self.length = None
        self.head_seen = False
        self.until_close = True  # no Content-Length and not chunked: the body ends at EOF
        transport = self.transport
        if transport is None or transport.is_closing():
            self._fail("the replica closed the connection before the request")
            return
        transport.write(data)
        if more:
            transport.write(more)

    def abort(self) -> None:
        """Drop the connection (and so the request at the replica); no more callbacks."""
        self.sink = None
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and self.transport.is_reading():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_reading():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.between and self.sink is not None:
            whole = whole_reply(data)
            if whole is not None:
                status, headers, body, keep_alive = whole
                sink, self.sink = self.sink, None
                self._settled(keep_alive)
                sink.on_reply(status, headers, body)
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"the replica sent a malformed reply: {exc}")

    def _settled(self, keep_alive: bool) -> None:
        """A reply ended: back to the pool, or closed."""
        if keep_alive:
            self.reused = True
            self.pool.put(self)
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if exc is None and self.sink is not None and self.head_seen and self.until_close:
            sink, self.sink = self.sink, None  # a body that ends where the connection does
            sink.on_end()
            return
        self._fail("the replica closed the connection" if exc is None else str(exc))

    def _fail(self, reason: str) -> None:
        sink, self.sink = self.sink, None
        if self.transport is not None:
            self.transport.abort()
        if sink is not None:
            sink.on_lost(reason)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in PASSED_HEADERS:
            self.headers.append((name, value))
        elif name == b"content-length":
            self.length = int(value) if value.isdigit() else None
            self.until_close = False
        elif name == b"transfer-encoding":
            self.until_close = False

    def on_headers_complete(self) -> None:
        self.head_seen = True
        if self.sink is not None:
            self.sink.on_head(self.parser.get_status_code(), self.headers, self.length)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_body(body)

    def on_message_begin(self) -> None:
        self.between = False

    def on_message_complete(self) -> None:
        self.between = True
        sink, self.sink = self.sink, None
        self._settled(self.parser.should_keep_alive())
        if sink is not None:
            sink.on_end()


def whole_reply(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool] | None:
    """Status, passed headers, body and keep-alive of `data` if it is exactly one complete
    HTTP/1.1 reply framed by Content-Length (the usual one); None leaves it to httptools (also
    any head line that is not a plain field, read byte by byte with `forwarder/scan.py`)."""
    end: i64 = data.find(b"\r\n\r\n")
    if end < 12 or not starts(data, 0, b"HTTP/1.1 "):
        return None
    status = digits(data, 9, 12)
    line_end: i64 = data.find(b"\r\n", 12, end + 2)
    if status < 100 or (line_end > 12 and data[12] != SP):
        return None  # not a three-digit status and a space before any reason phrase
    length: i64 = -1
    content_type: bytes | None = None
    keep_alive = True
    at: i64 = line_end + 2
    while at < end:
        colon, start, stop, after = field(data, at, end)
        if colon < 0:
            return None
        if named(data, at, colon, b"content-length"):
            if length >= 0:
                return None  # httptools refuses a second one
            length = digits(data, start, stop)
            if length < 0:
                return None
        elif content_type is None and named(data, at, colon, b"content-type"):
            content_type = data[start:stop]
        elif named(data, at, colon, b"transfer-encoding"):
            return None
        elif named(data, at, colon, b"connection"):
            # find, not `in`: CPython's `bytes in bytes` first tries the needle as an int and
            # raises (and clears) a TypeError, a formatted exception per test
            keep_alive = keep_alive and data[start:stop].lower().find(b"close") < 0
        at = after
    if length < 0 or len(data) != end + 4 + length:
        return None
    headers = [(b"content-type", content_type)] if content_type is not None else []
    return status, headers, data[end + 4 :], keep_alive


class UpstreamPool:
    """Idle connections per replica address (`http://host:port`), newest first."""

    def __init__(self, key_secret: bytes = b"") -> None:
        # every request to a replica carries that replica's own key (appliance/install.py),
        # made from the key secret; none without one
        self.key_secret = key_secret
        self.idle: dict[str, list[Connection]] = {}
        self._targets: dict[str, tuple[str, int]] = {}
        self._heads: dict[tuple[bytes, str, str], bytes] = {}

    def take(self, address: str) -> Connection | None:
        """An idle connection that is young enough to trust, or None."""
        idle = self.idle.get(address)
        now = monotonic()
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                if now - conn.idle_since < IDLE_MAX_S:
                    return conn
                transport.close()
        return None

    async def connect(self, address: str) -> Connection:
        """A new connection; OSError or TimeoutError when the replica does not accept it."""
        host, port = self._target(address)
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: Connection(self, address), host, port),
            timeout=CONNECT_TIMEOUT_S,
        )
        return conn

    def put(self, conn: Connection) -> None:
        idle = self.idle.setdefault(conn.address, [])
        if len(idle) >= IDLE_PER_ADDRESS:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = monotonic()
        idle.append(conn)

    def forget(self, conn: Connection) -> None:
        idle = self.idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    def drop(self, address: str) -> None:
        """Close the idle connections to a replica (one of them proved stale)."""
        for conn in self.idle.pop(address, []):
            if conn.transport is not None:
                conn.transport.close()

    def close(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self.idle.clear()

    def json_post_head(self, path: bytes, replica_id: str, address: str) -> bytes:
        """The head of a JSON POST of `path` to the replica, up to its Content-Length value:
        the same for every request of a route to one replica, so made once. Kept per replica
        id as well as address: a port a gone replica had may come back as another's."""
        found = self._heads.get((path, replica_id, address))
        if found is None:
            host, port = self._target(address)
            found = b"POST %b HTTP/1.1\r\nhost: %b:%d\r\ncontent-type: application/json\r\n%b" % (
                path,
                host.encode(),
                port,
                self._auth(replica_id),
            )
            found += b"content-length: "
            if len(self._heads) < MAX_HEADS:
                self._heads[(path, replica_id, address)] = found
        return found

    def _auth(self, replica_id: str) -> bytes:
        if not self.key_secret:
            return b""
        return b"authorization: Bearer %b\r\n" % replica_key(self.key_secret, replica_id).encode()

    def _target(self, address: str) -> tuple[str, int]:
        found = self._targets.get(address)
        if found is None:
            parts = urlsplit(address)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"not an http:// replica address: {address!r}")
            found = (parts.hostname, parts.port or 80)
            self._targets[address] = found
        return found
