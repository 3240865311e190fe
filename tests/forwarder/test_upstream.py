"""The fast lane's upstream client (`forwarder/upstream.py`) against raw replies: the three
ways an HTTP/1.1 body may end, reuse of a kept-alive connection, and a replica that hangs up,
during a reply or before the request is sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import uvloop

from appliance.install import replica_key
from forwarder.upstream import UpstreamPool, whole_reply

REQUEST = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


class Sink:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.body = b""
        self.ended = asyncio.get_running_loop().create_future()

    def on_head(self, status: int, headers: list[tuple[bytes, bytes]], length: int | None) -> None:
        self.status, self.headers, self.length = status, headers, length

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_end(self) -> None:
        self.ended.set_result("end")

    def on_reply(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.on_head(status, headers, len(body))
        self.on_body(body)
        self.on_end()

    def on_lost(self, reason: str) -> None:
        self.ended.set_result("lost: " + reason)


@asynccontextmanager
async def replica(answer: Callable[[int], bytes | None]) -> AsyncIterator[str]:
    """A server answering the n-th request on a connection with `answer(n)` (None: hang up)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while await reader.readuntil(b"\r\n\r\n"):
            await reader.readexactly(2)
            reply = answer(n)
            n += 1
            if reply is None:
                break
            writer.write(reply)
            await writer.drain()
            if b"content-length" not in reply and b"chunked" not in reply:
                break  # a body that ends with the connection
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def exchange(pool: UpstreamPool, address: str) -> Sink:
    conn = pool.take(address) or await pool.connect(address)
    sink = Sink()
    conn.send(REQUEST, sink)
    await asyncio.wait_for(sink.ended, 5)
    return sink


def test_each_way_a_body_ends_is_read_whole() -> None:
    asyncio.run(each_way_a_body_ends())


async def each_way_a_body_ends() -> None:
    replies = {
        "length": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n"
        b'{"a"',
        "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        "close": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end",
    }
    expected = {"length": b'{"a"', "chunked": b"abc", "close": b"until the end"}
    for kind, reply in replies.items():
        pool = UpstreamPool()
        async with replica(lambda n, reply=reply: reply) as address:  # type: ignore[misc]
            sink = await exchange(pool, address)
        assert (sink.status, sink.body, sink.ended.result()) == (200, expected[kind], "end"), kind
        if kind == "length":  # the passed headers only, names in lower case; the length apart
            assert sink.headers == [(b"content-type", b"application/json")]
            assert sink.length == 4


def test_a_kept_alive_connection_carries_the_next_request() -> None:
    asyncio.run(kept_alive())


async def kept_alive() -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    pool = UpstreamPool()
    async with replica(lambda n: reply) as address:
        first = await exchange(pool, address)
        idle = pool.idle[address]
        assert len(idle) == 1
        conn = idle[0]
        second = await exchange(pool, address)
    assert first.body == second.body == b"ok"
    assert conn.reused and pool.idle[address] == [conn]


def test_a_replica_that_hangs_up_reports_the_loss() -> None:
    asyncio.run(hangs_up())


async def hangs_up() -> None:
    pool = UpstreamPool()
    async with replica(lambda n: None) as address:
        sink = await exchange(pool, address)
    assert sink.status == 0 and sink.ended.result().startswith("lost")
    assert pool.take(address) is None


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_a_connection_closed_before_the_send_reports_the_loss(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A proxy in front of a replica that is gone (Docker's port proxy for a killed container)
    accepts the connection, then hangs up; the request sent after that must come back as lost
    (the relay sends it elsewhere), not vanish (asyncio) or raise (uvloop)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(closed_before_send())


async def closed_before_send() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    address = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = UpstreamPool()
    async with server:
        conn = await pool.connect(address)
        for _ in range(500):
            if conn.transport is not None and conn.transport.is_closing():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # connection_lost has run
        sink = Sink()
        conn.send(REQUEST, sink, b"more")
        outcome = await asyncio.wait_for(sink.ended, 5)
    assert sink.status == 0 and outcome.startswith("lost"), outcome
    assert pool.take(address) is None


def test_only_a_plain_reply_framed_by_its_length_is_read_whole_at_once() -> None:
    usual = (
        b"HTTP/1.1 200 OK\r\ndate: x\r\nContent-Type: application/json\r\n"
        b"content-length: 4\r\n\r\n{}{}"
    )
    headers = [(b"content-type", b"application/json")]  # the length is framing, not passed
    assert whole_reply(usual) == (200, headers, b"{}{}", True)
    closing = usual.replace(b"date: x", b"Connection: close")
    assert whole_reply(closing) == (200, headers, b"{}{}", False)
    left_to_httptools = {
        "chunked": usual.replace(b"date: x", b"transfer-encoding: chunked"),
        "two lengths": usual.replace(b"date: x", b"content-length: 4"),
        "a signed length": usual.replace(b"length: 4", b"length: +4"),
        "short": usual[:-1],
        "more than one reply": usual + usual,
        "a bare LF": usual.replace(b"date: x", b"date: x\ncontent-length: 9"),
        "a space in a name": usual.replace(b"date: x", b"da te: x"),
        "a four-digit status": usual.replace(b"200 OK", b"2000 OK"),
        "HTTP/1.0": usual.replace(b"HTTP/1.1", b"HTTP/1.0"),
    }
    for why, reply in left_to_httptools.items():
        assert whole_reply(reply) is None, why


def test_each_replica_is_sent_its_own_key() -> None:
    secret = bytes(range(32))
    pool = UpstreamPool(secret)
    path, address = b"/v1/completions", "http://127.0.0.1:8080"
    alice = pool.json_post_head(path, "rep_alice", address)
    assert b"authorization: Bearer %b\r\n" % replica_key(secret, "rep_alice").encode() in alice
    # the same port, later another replica's: its head carries that replica's key, not the
    # first one's kept head
    bob = pool.json_post_head(path, "rep_bob", address)
    assert b"authorization: Bearer %b\r\n" % replica_key(secret, "rep_bob").encode() in bob
    assert replica_key(secret, "rep_alice") != replica_key(secret, "rep_bob")
    assert b"authorization" not in UpstreamPool().json_post_head(path, "rep_alice", address)
