"""What the fast lane uses of uvicorn's internals (`api/lane/glue.py`, `api/lane/front.py`) is
still there in the installed uvicorn. A uvicorn release that renames or drops any of it fails
here, by name, rather than breaking connections at run time."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from api.lane.glue import GeneralProtocol, head_end


class Transport(asyncio.Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True


def test_uvicorns_protocol_still_has_what_the_lane_uses() -> None:
    # the protocol class uvicorn calls for `http=`: these keyword arguments, in this order
    params = list(inspect.signature(HttpToolsProtocol.__init__).parameters)
    assert params[:5] == ["self", "config", "server_state", "app_state", "_loop"]
    for hook in (
        "on_message_begin",
        "on_message_complete",
        "on_response_complete",
        "on_headers_complete",
        "on_body",
        "connection_lost",
    ):
        assert callable(getattr(HttpToolsProtocol, hook)), hook
    for method in (
        "_unset_keepalive_if_required",
        "connection_made",
        "data_received",
        "send_400_response",  # HeadBoundProtocol.feed, for a head httptools cannot read
    ):
        assert callable(getattr(HttpToolsProtocol, method)), method
    for method in ("pause_writing", "resume_writing", "shutdown"):
        assert callable(getattr(HttpToolsProtocol, method)), method

    async def made() -> None:
        config = Config(app=lambda scope, receive, send: None, http="httptools")
        config.load()
        state = ServerState()
        for name in ("connections", "default_headers", "total_requests", "tasks"):
            assert hasattr(state, name), name
        protocol = GeneralProtocol(
            config=config, server_state=state, app_state={}, _loop=asyncio.get_running_loop()
        )
        protocol.connection_made(Transport())
        assert isinstance(protocol.pipeline, object) and len(protocol.pipeline) == 0
        assert protocol.flow.write_paused is False and protocol.flow.read_paused is False
        assert protocol in state.connections
        assert isinstance(config.timeout_keep_alive, int | float)
        assert protocol.cycle is None  # a 431 is written only with no reply under way
        # what HeadBoundProtocol.feed reads again of a head asking to switch protocols
        protocol.on_message_begin()
        assert protocol.url == b"" and protocol.headers == [] and protocol.logger is not None
        assert callable(protocol.parser.get_method) and callable(protocol.parser.should_upgrade)

    # what HeadBoundProtocol asks of a reply under way when a next head is too long, and of a
    # request whose body comes too slowly (whether it was asked for yet, whether a reply began)
    assert {"keep_alive", "expect_100_continue"} <= set(
        inspect.signature(RequestResponseCycle.__init__).parameters
    )
    source = inspect.getsource(RequestResponseCycle.__init__)
    assert "self.waiting_for_100_continue" in source and "self.response_started" in source
    asyncio.run(made())


def test_a_heads_end_is_found_within_a_read_and_across_two() -> None:
    assert head_end(b"", b"GET / HTTP/1.1\r\nhost: x\r\n\r\nbody") == 27
    assert head_end(b"", b"GET / HTTP/1.1\r\nhost: x\r\n") == -1
    assert head_end(b"x\r\n", b"\r\nbody") == 2
    assert head_end(b"\r\n\r", b"\nbody") == 1
    assert head_end(b"y\r\n", b"z\r\n\r\n") == 5
    assert head_end(b"abc", b"") == -1
