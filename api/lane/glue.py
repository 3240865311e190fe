"""Every use the fast lane makes of uvicorn's internals, in one place: the protocol uvicorn makes
per connection (`http=` accepts a class, called with `config`, `server_state`, `app_state` and
`_loop`) and its httptools protocol, which the lane hands a connection to for every request it
does not carry (`hand_over`), and which hands the connection back once its reply is complete
(`GeneralProtocol.on_response_complete`).

What is used here is what `tests/api/test_lane_glue.py` checks against the installed uvicorn,
so a uvicorn release that changes any of it fails that test by name instead of misbehaving.
Not compiled (it subclasses uvicorn's protocol).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

# transport, whether writing was paused -> the front protocol that takes the connection back
GiveBack = Callable[[asyncio.Transport, bool], None]


class GeneralProtocol(HttpToolsProtocol):
    """uvicorn's own protocol, which gives the connection back to the front protocol when a
    reply is complete and no byte of a next request has been read: so a request the lane does
    not carry (a framing it does not read, CORS) does not keep its connection off the lane."""

    between = False  # the last request was read to its end and no next one has begun
    give_back: GiveBack | None = None
    header_timeout_s = 10.0  # a request's head must arrive within this, from its first byte
    head_timer: asyncio.TimerHandle | None = None

    def on_message_begin(self) -> None:
        self.between = False
        self.await_head()
        super().on_message_begin()

    def await_head(self) -> None:
        """Close the connection unless a whole head arrives within the header timeout."""
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.between = True

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
) -> None:
    """Give the connection, with the bytes read and not consumed, to uvicorn's protocol."""
    protocol = GeneralProtocol(
        config=config, server_state=server_state, app_state=app_state, _loop=loop
    )
    protocol.give_back = give_back
    protocol.header_timeout_s = header_timeout_s
    protocol.connection_made(transport)
    protocol.await_head()
    transport.set_protocol(protocol)
    if write_paused:
        protocol.pause_writing()
    if not transport.is_reading():
        transport.resume_reading()
    if data:
        protocol.data_received(data)
