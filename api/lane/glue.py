"""Every use the fast lane makes of uvicorn's internals, in one place: the protocol uvicorn makes
per connection (`http=` accepts a class, called with `config`, `server_state`, `app_state` and
`_loop`) and its httptools protocol, which the lane hands a connection to for every request it
does not carry (`hand_over`), and which hands the connection back once its reply is complete
(`GeneralProtocol.on_response_complete`). With the lane off (`api/serve.py`), uvicorn makes
`HeadBoundProtocol` for every connection (`plain_protocol`).

httptools sets no bound on a request's head, and gathers a header whole before it hands it on:
`HeadBoundProtocol` counts a head's bytes as they arrive and answers one longer than
`max_head_bytes` 431 before httptools holds more than one read past the bound.

The api speaks HTTP/1.1 alone. httptools stops at a request that asks to switch protocols
(`Upgrade: h2c`, which `curl --http2` sends on http://, or `websocket`), before its body, and
uvicorn answered it with no body and dropped what followed (or handed it to a websocket
server, outside the key gate, the header timeout and the address count): `HeadBoundProtocol`
declines the upgrade, as HTTP allows, and reads the request again without its `Upgrade` field.

What is used here is what `tests/api/test_lane_glue.py` checks against the installed uvicorn,
so a uvicorn release that changes any of it fails that test by name instead of misbehaving.
Not compiled (it subclasses uvicorn's protocol).
"""

from __future__ import annotations

import asyncio
import http
import json
from collections.abc import Callable
from typing import Any, cast

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from api.errors import openai_error

# transport, whether writing was paused -> the front protocol that takes the connection back
GiveBack = Callable[[asyncio.Transport, bool], None]

MAX_HEAD_BYTES = 64 * 1024  # `Settings.max_head_bytes`'s default
# After a 431, what the client still sends is read and dropped this long before the connection
# closes: closed with its bytes unread, the client would get a reset instead of the answer.
LINGER_S = 1.0
TOO_LARGE = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
TOO_MANY = http.HTTPStatus.TOO_MANY_REQUESTS
TOO_SLOW = http.HTTPStatus.REQUEST_TIMEOUT
# A request body must keep coming at this pace: at least so many bytes (or the rest of it) in
# every header timeout. A body sent a byte at a time, each just within the timeout of the last,
# held its connection for as long as it went on; a client this slow gets a 408 and the
# connection closes. Time the server itself is not reading (its app has not taken what came)
# is not held against the client.
BODY_PACE_BYTES = 16 * 1024


def too_slow_reply(default_headers: list[Any], timeout_s: float) -> bytes:
    """The 408 for a body that came slower than BODY_PACE_BYTES a header timeout."""
    message = (
        f"the request body came too slowly: send at least {BODY_PACE_BYTES} bytes of it every "
        f"{timeout_s:g} s (APPLIANCE_HEADER_TIMEOUT_S)"
    )
    body = json.dumps(openai_error(TOO_SLOW.value, message) | {"detail": message}).encode()
    lines = [b"HTTP/1.1 %d %b\r\n" % (TOO_SLOW.value, TOO_SLOW.phrase.encode())]
    lines.extend(b"%b: %b\r\n" % h for h in default_headers)
    lines.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    lines.append(b"connection: close\r\n\r\n")
    return b"".join(lines) + body


class AddressGate:
    """Connections open from each client address, at most `most` at once (0: no bound); one
    server's, shared by every protocol a connection passes through (the lane's and uvicorn's),
    so each connection is counted once, from its first protocol's `admit` to its last one's
    `release` (`connection_lost` comes once, to whichever protocol holds it then)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.open: dict[str, set[asyncio.BaseTransport]] = {}

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count the connection (again: no change); False when its address is at the bound."""
        address = address_of(transport)
        if not self.most or address is None:
            return True
        held = self.open.setdefault(address, set())
        if transport in held:
            return True
        if len(held) >= self.most:
            if not held:
                del self.open[address]
            return False
        held.add(transport)
        return True

    def release(self, transport: asyncio.BaseTransport | None) -> None:
        address = address_of(transport) if transport is not None else None
        held = self.open.get(address) if address is not None else None
        if held is not None and transport is not None:
            held.discard(transport)
            if not held:
                del self.open[address]  # type: ignore[arg-type]

    def refuse(self, transport: asyncio.BaseTransport, default_headers: list[Any]) -> None:
        """429 and close: the client learns why (a plain close reads as a network fault)."""
        message = (
            f"too many connections from this address: at most {self.most} at once "
            "(APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS); reuse connections or close idle ones"
        )
        body = json.dumps(openai_error(TOO_MANY.value, message) | {"detail": message}).encode()
        lines = [b"HTTP/1.1 %d %b\r\n" % (TOO_MANY.value, TOO_MANY.phrase.encode())]
        lines.extend(b"%b: %b\r\n" % h for h in default_headers)
        lines.append(b"retry-after: 1\r\ncontent-type: application/json\r\n")
        lines.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(b"".join(lines) + body)
        writer.close()


def address_of(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


class HeadBoundProtocol(HttpToolsProtocol):
    """uvicorn's own protocol, with a bound on each request's head (its request line and
    headers): past `max_head_bytes` the request is answered 431 and the connection closed.
    Counted per read, before httptools sees it, up to the blank line that ends the head.
    And with the header timeout: a request's head must arrive whole within it from its first
    byte (a connection that sends none, from its start), or the connection closes; its body
    must then keep the pace of BODY_PACE_BYTES a timeout, or it is answered 408."""

    max_head_bytes = MAX_HEAD_BYTES
    head_bytes = 0  # of the head being read; -1 while a body is
    head_tail = b""  # the head's last bytes: its blank line may straddle two reads
    refused = False  # a 431 was sent: what arrives now is dropped
    linger: asyncio.TimerHandle | None = None
    gate: AddressGate | None = None
    header_timeout_s = 10.0  # a request's head must arrive within this, from its first byte
    head_timer: asyncio.TimerHandle | None = None  # the head's deadline, or the body's pace
    body_bytes = -1  # of the body since the pace was last checked; -1 while a head is read
    upgrading = False  # the head just read asks to switch protocols: it is read again without

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if self.gate is not None and not self.gate.admit(transport):
            self.refused = True
            self.gate.refuse(transport, self.server_state.default_headers)
            return
        self.await_head()

    def on_message_begin(self) -> None:
        self.await_head()
        super().on_message_begin()

    def await_head(self) -> None:
        """Close the connection unless a whole head arrives within the header timeout."""
        self.body_bytes = -1
        self._arm()

    def _arm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _stop_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        super().on_body(body)

    def _late(self) -> None:
        """The header timeout passed: a head not in yet closes its connection; a body that
        brought less than BODY_PACE_BYTES meanwhile, while the server read on, is a 408."""
        self.head_timer = None
        transport = self.transport
        if transport.is_closing():
            return
        if self.body_bytes < 0:
            transport.close()
            return
        cycle = self.cycle
        if (
            self.body_bytes >= BODY_PACE_BYTES
            or self.flow.read_paused  # the app has not taken what came: not the client's fault
            or (cycle is not None and cycle.waiting_for_100_continue)  # nor a body not asked yet
        ):
            self.body_bytes = 0
            self._arm()
            return
        self.refused = True  # what arrives now is dropped
        if cycle is not None and cycle.response_started:
            transport.close()  # a reply under way: cut
            return
        timeout = self.header_timeout_s
        self.answer_and_close(too_slow_reply(self.server_state.default_headers, timeout))

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        if self.head_bytes >= 0:
            end = head_end(self.head_tail, data)
            size = self.head_bytes + (len(data) if end < 0 else end)
            if size > self.max_head_bytes:
                self.refuse_head()
                return
            self.head_bytes = size
            self.head_tail = (self.head_tail + data[-3:])[-3:]
        self.feed(data)

    def feed(self, data: bytes, declined: bool = False) -> None:
        """uvicorn's `data_received`, but for a request asking to switch protocols: its head
        is read again without the `Upgrade` field, followed by the bytes after it (its body,
        requests after it), as though it had come so (a CONNECT, an upgrade whatever its
        fields, is a 400)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.invalid()
        except httptools.HttpParserUpgrade as exc:
            if declined or self.parser.get_method() == b"CONNECT":
                self.invalid()
                return
            head = [b"%b %b HTTP/%b\r\n" % (
                self.parser.get_method(), self.url, self.parser.get_http_version().encode()
            )]  # fmt: skip
            head.extend(b"%b: %b\r\n" % h for h in self.headers if h[0] != b"upgrade")
            self.upgrading = False
            self.parser = httptools.HttpRequestParser(self)
            self.feed(b"".join(head) + b"\r\n" + data[exc.args[0] :], declined=True)

    def invalid(self) -> None:
        message = "Invalid HTTP request received."
        self.logger.warning(message)
        self.send_400_response(message)

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            self.upgrading = True  # not a request yet: `feed` reads it again
            return
        self.head_bytes, self.head_tail = -1, b""
        self.body_bytes = 0  # the body's pace from now
        self._arm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self.upgrading:
            return
        self.head_bytes, self.head_tail = 0, b""  # a next request's head may follow
        self._stop_timer()
        super().on_message_complete()

    def refuse_head(self) -> None:
        """431 and close. A reply still being written to an earlier request is not cut: the
        connection stops reading and closes once that reply is complete."""
        self.refused = True
        transport = self.transport
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            transport.pause_reading()
            return
        message = f"the request head (request line and headers) is over {self.max_head_bytes} bytes"
        body = json.dumps(openai_error(TOO_LARGE.value, message) | {"detail": message}).encode()
        lines = [b"HTTP/1.1 %d %b\r\n" % (TOO_LARGE.value, TOO_LARGE.phrase.encode())]
        lines.extend(b"%b: %b\r\n" % h for h in self.server_state.default_headers)
        lines.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        lines.append(b"connection: close\r\n\r\n")
        self.answer_and_close(b"".join(lines) + body)

    def answer_and_close(self, reply: bytes) -> None:
        """Write `reply`, then close once the client has had LINGER_S to read it (what it still
        sends meanwhile is dropped: `refused`)."""
        transport = self.transport
        transport.write(reply)
        if transport.can_write_eof():
            transport.write_eof()
            self.linger = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        if self.gate is not None:
            self.gate.release(self.transport)
        super().connection_lost(exc)


def head_end(tail: bytes, data: bytes) -> int:
    """How many bytes of `data` belong to the head whose last bytes so far are `tail`, when its
    blank line ends within them; else -1."""
    if tail:
        joined = (tail + data[:3]).find(b"\r\n\r\n")
        if joined >= 0:
            return joined + 4 - len(tail)
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else -1


def plain_protocol(
    max_head_bytes: int, gate: AddressGate | None = None, header_timeout_s: float = 10.0
) -> Callable[..., HeadBoundProtocol]:
    """What uvicorn should make each connection's protocol with when the lane is off."""

    def make(
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> HeadBoundProtocol:
        protocol = HeadBoundProtocol(
            config=config, server_state=server_state, app_state=app_state, _loop=_loop
        )
        protocol.max_head_bytes = max_head_bytes
        protocol.gate = gate
        protocol.header_timeout_s = header_timeout_s
        return protocol

    return make


class GeneralProtocol(HeadBoundProtocol):
    """uvicorn's own protocol, which gives the connection back to the front protocol when a
    reply is complete and no byte of a next request has been read: so a request the lane does
    not carry (a framing it does not read, CORS) does not keep its connection off the lane."""

    between = False  # the last request was read to its end and no next one has begun
    give_back: GiveBack | None = None

    def on_message_begin(self) -> None:
        self.between = False
        super().on_message_begin()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.between = not self.upgrading

    def on_response_complete(self) -> None:
        super().on_response_complete()
        transport = self.transport
        if not self.between or self.pipeline or transport.is_closing() or not self.give_back:
            return
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        self.give_back(transport, self.flow.write_paused)


def hand_over(
    transport: asyncio.Transport,
    data: bytes,
    write_paused: bool,
    config: Config,
    server_state: ServerState,
    app_state: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    give_back: GiveBack,
    header_timeout_s: float,
    max_head_bytes: int = MAX_HEAD_BYTES,
    gate: AddressGate | None = None,
) -> None:
    """Give the connection, with the bytes read and not consumed, to uvicorn's protocol."""
    protocol = GeneralProtocol(
        config=config, server_state=server_state, app_state=app_state, _loop=loop
    )
    protocol.give_back = give_back
    protocol.gate = gate  # it counted the connection already: admitted again, no change
    protocol.header_timeout_s = header_timeout_s
    protocol.max_head_bytes = max_head_bytes
    protocol.connection_made(transport)
    protocol.await_head()
    transport.set_protocol(protocol)
    if write_paused:
        protocol.pause_writing()
    if not transport.is_reading():
        transport.resume_reading()
    if data:
        protocol.data_received(data)
