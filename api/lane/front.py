"""The fast lane: the api's first protocol on every connection, a transport for the inference
routes that reads and writes HTTP/1.1 itself, with no ASGI cycle, task or coroutine per request.

uvicorn makes one `FrontProtocol` per connection (`http=` in `api/serve.py`). It reads each
request head with a deliberately narrow parser: `POST` to a path of `forwarder/paths.py` over
HTTP/1.1 with a Content-Length body, no Transfer-Encoding, Expect or Upgrade. Such a request,
once its body is in, becomes a `Call` (`api/inference/call.py`) that this protocol answers as
its `Client`; the call admits and relays it exactly as it would over ASGI. Every other request
is handed, with all of its bytes, to uvicorn's own protocol (`api/lane/glue.py`), which gives
the connection back once its reply is complete; so is a request whose body is still to come
on a key this process never found valid, which uvicorn's key gate answers before reading the
body. The lane decides nothing about a request: it only carries those it can read.

Client header bytes are parsed here but never forwarded: the relay writes its own request to
the replica, so a head this parser reads differently from httptools cannot reach a replica.
"""

from __future__ import annotations

import asyncio
import http
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from fastapi import FastAPI
from uvicorn.config import Config
from uvicorn.server import ServerState

from api.bodies import SMALL_BODY_BYTES, Reading
from api.deps import parse_key
from api.inference.call import Call, Core
from api.inference.llm_engine import make_call
from api.lane.glue import BODY_PACE_BYTES, LINGER_S, AddressGate, hand_over, too_slow_reply
from appliance.errors import ApplianceError
from forwarder.paths import BY_PATH, InferencePath
from forwarder.relay import Headers
from forwarder.scan import SP, digits, field, named, starts

if TYPE_CHECKING:  # only annotations name it (strings at run time); compiled, a native int
    from mypy_extensions import i64

# A longer head goes to uvicorn's protocol, which answers one past `max_head_bytes` 431
# (`glue.py`); `Settings.max_head_bytes` is never below this, so the lane refuses no head.
MAX_HEAD_BYTES: Final = 16 * 1024
PIPELINED_MAX_BYTES: Final = 64 * 1024  # buffered while a reply is in progress, then paused
HOT_PATHS: Final = {entry.path.encode(): entry for entry in BY_PATH.values()}
STATUS_LINES: Final = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus
}
MAX_PREFIXES: Final = 256  # reply heads kept (status and content type vary little)


class Head:
    """What the lane reads of a request head. A plain class: compiled, a native one."""

    __slots__ = ("api_key", "authorization", "entry", "keep_alive", "length", "origin", "query")

    def __init__(
        self,
        entry: InferencePath,
        query: str,
        length: int,
        authorization: str,
        api_key: str | None,
        origin: bool,
        keep_alive: bool,
    ) -> None:
        self.entry = entry
        self.query = query
        self.length = length
        self.authorization = authorization
        self.api_key = api_key
        self.origin = origin
        self.keep_alive = keep_alive


def parse_head(buf: bytes, end: i64) -> Head | None:
    """The head `buf[:end]` if the lane can carry its request, else None. Read byte by byte
    (`forwarder/scan.py`); any field line that is not a plain `name: value` sends the request
    to uvicorn, as do the framings the lane does not do (Transfer-Encoding, Expect, Upgrade)
    and a key sent twice (uvicorn's key gate refuses it: `api.deps.key_of_raw`)."""
    if not starts(buf, 0, b"POST "):
        return None
    at: i64 = 5
    query_at: i64 = -1
    while at < end and buf[at] != SP:
        c: i64 = buf[at]
        if c < SP or c >= 127:  # httptools refuses these in a URL; a CR, LF: another line
            return None
        if c == 63 and query_at < 0:  # ?
            query_at = at
        at += 1
    if not starts(buf, at, b" HTTP/1.1\r\n") or at + 11 > end:
        return None  # also no header at all, so no Content-Length
    entry = HOT_PATHS.get(buf[5 : query_at if query_at >= 0 else at])
    if entry is None:
        return None
    query = buf[query_at + 1 : at].decode("latin-1") if query_at >= 0 else ""
    length: i64 = -1
    authorization = ""
    api_key = None
    origin = False
    keep_alive = True
    twice: i64 = 0  # 1: an Authorization seen, 2: an X-Api-Key seen
    at += 11
    while at < end:
        colon, start, stop, after = field(buf, at, end)
        if colon < 0:
            return None
        size: i64 = colon - at  # the name's: the field is looked at only if that one may match
        if size == 14 and named(buf, at, colon, b"content-length"):
            if length >= 0:
                return None
            length = digits(buf, start, stop)
            if length < 0:
                return None
        elif size == 13 and named(buf, at, colon, b"authorization"):
            if twice & 1:
                return None  # a key sent twice: uvicorn's key gate refuses it (api/deps.py)
            twice |= 1
            authorization = buf[start:stop].decode("latin-1")
        elif size == 9 and named(buf, at, colon, b"x-api-key"):
            if twice & 2:
                return None
            twice |= 2
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
    return Head(entry, query, length, authorization, api_key, origin, keep_alive)


class Heads:
    """What every connection of the server shares: the status lines and headers of replies, but
    for their framing and timing (the same for most replies, so made once per second: uvicorn
    renews its date header each second), and the connection limits: how long a request may take
    to arrive (its head from its first byte, its body between two reads), how many connections
    are held at most (one more is closed at once) and how long a head may be (the lane hands a
    longer one than its own MAX_HEAD_BYTES to uvicorn's protocol, which counts to this)."""

    def __init__(
        self,
        header_timeout_s: float = 10.0,
        max_connections: int = 4096,
        max_head_bytes: int = 64 * 1024,
        max_per_address: int = 0,
    ) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self.gate = AddressGate(max_per_address)
        self.defaults: list[tuple[bytes, bytes]] | None = None
        self.prefixes: dict[tuple[int, tuple[tuple[bytes, bytes], ...], bool], bytes] = {}

    def prefix(
        self, status: int, headers: Headers, keep_alive: bool, defaults: list[tuple[bytes, bytes]]
    ) -> bytes:
        if defaults is not self.defaults:
            self.defaults = defaults
            self.prefixes = {}
        key = (status, tuple(headers), keep_alive)
        found = self.prefixes.get(key)
        if found is None:
            lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
            lines.extend(b"%b: %b\r\n" % h for h in (*defaults, *headers))
            if not keep_alive:
                lines.append(b"connection: close\r\n")
            found = b"".join(lines)
            if len(self.prefixes) < MAX_PREFIXES:
                self.prefixes[key] = found
        return found


def timing(overhead_s: float, waited_s: float) -> bytes:
    out = b"x-appliance-overhead-ms: %.3f\r\n" % (overhead_s * 1000) if overhead_s >= 0 else b""
    if waited_s >= 0.001:
        out += b"x-appliance-wait-ms: %.0f\r\n" % (waited_s * 1000)
    return out


def front_protocol(
    app: FastAPI,
    header_timeout_s: float = 10.0,
    max_connections: int = 4096,
    max_head_bytes: int = 64 * 1024,
    max_per_address: int = 0,
) -> Callable[..., FrontProtocol]:
    """What uvicorn should make each connection's protocol with (`http=`, called like its own
    protocol classes), for `app`, whose state holds the appliance once started. A factory
    rather than a subclass per app: the compiled build of this module allows no subclasses."""
    heads = Heads(header_timeout_s, max_connections, max_head_bytes, max_per_address)

    def make(
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> FrontProtocol:
        return FrontProtocol(app, heads, config, server_state, app_state, _loop)

    return make


class FrontProtocol(asyncio.Protocol):
    def __init__(
        self,
        app: FastAPI,
        heads: Heads,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.app = app
        self.heads = heads
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""  # unconsumed bytes; while a reply runs, the requests after its own
        self.more: list[bytes] = []  # chunks of a body still arriving
        self.need = 0  # bytes needed in all before parsing again
        self.have = 0
        self.call: Call | None = None
        self.keep_alive = True
        self.chunked = False
        self.core: Core | None = None
        self.serving = False  # in serve(): a reply finished within it does not re-enter it
        self.idle_timer: asyncio.TimerHandle | None = None  # armed once, re-armed when it fires
        self.idle_since: float | None = None  # loop time the last reply ended; None: busy
        self.head_since: float | None = None  # loop time a request began arriving; None: none
        self.paced = 0  # bytes of its body since `head_since` last moved (`BODY_PACE_BYTES`)
        self.write_paused = False
        self.reading_paused = False  # by this protocol, for pipelined bytes past the limit
        self.closing = False
        self.unread = False  # a body refused unread: the connection lingers, then closes
        self.handed = False
        self.reading: Reading | None = None  # the budget a body still arriving holds

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if len(self.server_state.connections) >= self.heads.max_connections:
            self.transport.close()  # over the cap: refused before it costs anything more
            return
        if not self.heads.gate.admit(transport):
            self.closing = True
            self.heads.gate.refuse(transport, self.server_state.default_headers)
            return
        self.server_state.connections.add(self)  # type: ignore[arg-type]
        self._idle()  # a connection that never sends a byte is closed as an idle one

    def connection_lost(self, exc: Exception | None) -> None:
        self.heads.gate.release(self.transport)
        self.server_state.connections.discard(self)
        self._cancel_idle()
        self._give_body()
        call, self.call = self.call, None
        if call is not None:
            call.client_gone()

    def data_received(self, data: bytes) -> None:
        if self.closing and self.call is None:
            return  # refused: what still comes is dropped
        self.idle_since = None
        if self.call is None and self.head_since is None:
            self.head_since = self.loop.time()  # a head from its first byte
        if self.need:
            self.more.append(data)
            self.have += len(data)
            self.paced += len(data)
            if self.paced >= BODY_PACE_BYTES:  # a body: that many bytes each header timeout
                self.head_since = self.loop.time()
                self.paced = 0
            if self.have < self.need:
                return
            self.buffer = b"".join([self.buffer, *self.more])
            self.more = []
            self.need = 0
        else:
            self.buffer = self.buffer + data if self.buffer else data
        if self.call is None:
            self.serve()
        elif len(self.buffer) > PIPELINED_MAX_BYTES and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.call is not None:
            self.call.pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.call is not None:
            self.call.resume()

    # uvicorn's server calls this on graceful shutdown
    def shutdown(self) -> None:
        if self.call is None:
            if self.transport is not None:
                self.transport.close()
        else:
            self.closing = True

    # requests
    def serve(self) -> None:
        """Serve the buffered requests in order until one is incomplete or handed over."""
        self.serving = True
        try:
            self._serve()
        finally:
            self.serving = False
        if self.call is None and not self.handed and not self.buffer:
            self._idle()

    def _serve(self) -> None:
        while self.call is None and self.buffer and not self.handed:
            buf = self.buffer
            end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
            if end < 0:
                # a head whose lines end in bare LFs is none the lane reads, and would never
                # end for it: uvicorn's parser answers it (400) at once, where the header
                # timeout closed it unanswered
                if len(buf) >= MAX_HEAD_BYTES or buf.find(b"\n\n", 0, MAX_HEAD_BYTES) >= 0:
                    self._hand_over()
                return
            core = self.core or self._find_core()
            head = parse_head(buf, end)
            if (
                core is None
                or head is None
                or head.length > core.max_body_bytes
                or (head.origin and core.cors)
            ):
                self._hand_over()
                return
            total = end + 4 + head.length
            authorization = head.authorization
            # the usual form, without parse_key's general case; as parse_key reads it, a
            # Bearer value Python strips to nothing (a no-break space) names no key there
            key: str | None = authorization[7:].strip() if authorization[:7] == "Bearer " else ""
            if not key:
                key = parse_key(authorization, head.api_key)
            if len(buf) < total:
                if key is None or not core.keys.found_valid(key):
                    # a body still to come on a key this process never found valid: uvicorn's
                    # key gate answers it before reading the body, so no one without a key
                    # makes this process hold a body (up to max_body_bytes on each connection)
                    self._hand_over()
                    return
                if head.length > SMALL_BODY_BYTES:  # its bytes are held from now
                    reading = Reading(core.bodies, key)
                    refused = reading.upto(head.length)
                    if refused is not None:
                        self._refuse_body(core, head, key, refused)
                        return
                    self.reading = reading
                self.need, self.have, self.paced = total, len(buf), 0
                return
            # the request is whole: the buffer keeps only what follows it, so the body is held
            # once (as the call's) while the call waits and is relayed
            self.buffer = buf[total:]
            self.head_since = None
            self.keep_alive = head.keep_alive
            call = make_call(core, head.entry, self, key, head.query)
            self.call = call
            core.plane.stats.fast_lane += 1
            # a body over SMALL_BODY_BYTES holds its bytes of the budget until its call ends
            # (refused, answered at once, when there is no room); a smaller one costs this test
            if head.length <= SMALL_BODY_BYTES or self._held(call, key, head.length):
                call.start(buf[end + 4 : total])

    def _refuse_body(self, core: Core, head: Head, key: str, refused: ApplianceError) -> None:
        """A body the budget of bodies in flight has no room for (`api/bodies.py`): answered
        before a byte of it is read, and the connection closes once the client has had
        LINGER_S to read the answer (what it still sends is dropped)."""
        self.buffer = b""
        self.head_since = None
        self.keep_alive = False
        self.unread = True
        call = make_call(core, head.entry, self, key, head.query)
        self.call = call
        call.refuse(refused)

    def _held(self, call: Call, key: str | None, length: int) -> bool:
        """Hand the body's bytes of the budget of bodies in flight to its call, which holds
        them until it ends (`api/bodies.py`): taken at its head, or now, for a body that came
        with its head; False when there is no room, the call refused."""
        reading = self.reading
        self.reading = None
        if reading is None:
            reading = Reading(call.core.bodies, key or "")
            refused = reading.upto(length)
            if refused is not None:
                call.refuse(refused)
                return False
        call.reading = reading
        return True

    def _give_body(self) -> None:
        """Give back what a body still arriving took from the budget: it is refused, too slow,
        or its client is gone."""
        reading = self.reading
        self.reading = None
        if reading is not None:
            reading.done()

    def _find_core(self) -> Core | None:
        """The inference core, once the app's lifespan made it (until then every request goes
        to uvicorn, which answers as the app does while starting)."""
        self.core = getattr(self.app.state, "inference", None)
        return self.core

    def _idle(self) -> None:
        """Between requests: the keep-alive timeout runs from now."""
        self.idle_since = self.loop.time()
        if self.idle_timer is None:
            self.idle_timer = self.loop.call_later(
                self.config.timeout_keep_alive, self._idle_timeout
            )

    def _hand_over(self) -> None:
        """Give the connection, with every unconsumed byte, to uvicorn's own protocol."""
        assert self.transport is not None
        self.handed = True
        self.call = None
        self._cancel_idle()
        self.server_state.connections.discard(self)
        data = b"".join([self.buffer, *self.more])
        self.buffer, self.more, self.need = b"", [], 0
        hand_over(
            self.transport, data, self.write_paused, self.config, self.server_state,
            self.app_state, self.loop, self._taken_back, self.heads.header_timeout_s,
            self.heads.max_head_bytes, self.heads.gate,
        )  # fmt: skip

    def _taken_back(self, transport: asyncio.Transport, write_paused: bool) -> None:
        """uvicorn's protocol gives the connection back (`api/lane/glue.py`)."""
        front = FrontProtocol(
            self.app, self.heads, self.config, self.server_state, self.app_state, self.loop
        )
        front.connection_made(transport)
        front.write_paused = write_paused
        transport.set_protocol(front)
        front.serve()

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _idle_timeout(self) -> None:
        """Close a connection idle for uvicorn's keep-alive timeout, or whose request has not
        arrived within the header timeout (its body: BODY_PACE_BYTES a timeout, or a 408);
        busy or lately active, look again when it could be."""
        self.idle_timer = None
        left: float
        if self.idle_since is not None:
            left = self.idle_since + self.config.timeout_keep_alive - self.loop.time()
        elif self.call is None and self.head_since is not None:  # a request still arriving
            left = self.head_since + self.heads.header_timeout_s - self.loop.time()
        else:
            left = float(self.config.timeout_keep_alive)
        if left > 0:
            self.idle_timer = self.loop.call_later(left, self._idle_timeout)
        elif self.transport is not None and not self.transport.is_closing():
            if self.need and self.call is None:  # a body too slow: told so (a head is not)
                self._too_slow(self.transport)
                return
            self.transport.close()

    def _too_slow(self, transport: asyncio.Transport) -> None:
        """The 408 of a body that came too slowly; the connection closes once the client has
        had LINGER_S to read it, and what it still sends is dropped (`closing`)."""
        self._give_body()
        timeout = self.heads.header_timeout_s
        transport.write(too_slow_reply(self.server_state.default_headers, timeout))
        self._linger(transport)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close once the client has had LINGER_S to read the answer just written, rather than
        with its bytes unread (it would get a reset instead); what it still sends is dropped."""
        self.closing = True
        self._cancel_idle()
        if transport.can_write_eof():
            transport.write_eof()
            self.idle_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    # api.inference.call.Client
    def _prefix(self, status: int, headers: Headers) -> bytes:
        defaults = self.server_state.default_headers
        return self.heads.prefix(status, headers, self.keep_alive and not self.closing, defaults)

    def start(
        self, status: int, headers: Headers, length: int, overhead_s: float, waited_s: float
    ) -> None:
        self.chunked = length < 0
        framing = (
            b"transfer-encoding: chunked\r\n"
            if self.chunked
            else b"content-length: %d\r\n" % length
        )
        self._write(
            b"%b%b%b\r\n" % (self._prefix(status, headers), timing(overhead_s, waited_s), framing)
        )

    def send(self, data: bytes) -> None:
        if self.chunked:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def end(self) -> None:
        if self.chunked:
            self._write(b"0\r\n\r\n")
        self._finished()

    def whole(
        self, status: int, headers: Headers, body: bytes, overhead_s: float, waited_s: float
    ) -> None:
        self._write(
            b"%b%bcontent-length: %d\r\n\r\n%b"
            % (self._prefix(status, headers), timing(overhead_s, waited_s), len(body), body)
        )
        self._finished()

    def cut(self) -> None:
        self.call = None
        if self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _finished(self) -> None:
        """The reply is complete: the connection carries the next request, or closes."""
        self.call = None
        self.server_state.total_requests += 1
        self.head_since = self.loop.time() if self.buffer else None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.unread:
            self._linger(transport)
            return
        if not self.keep_alive or self.closing:
            transport.close()
            return
        if self.reading_paused:  # only this protocol pauses it: no call to ask the transport
            self.reading_paused = False
            transport.resume_reading()
        if self.serving:
            return  # serve() goes on with the next request
        if self.buffer:
            self.serve()  # a pipelined request
        else:
            self._idle()
