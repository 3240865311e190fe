"""A fast fake OpenAI backend for benchmarks: raw asyncio + httptools on uvloop.

Any POST answers a fixed chat.completion JSON body (with `usage`), or, when the body holds
`"stream": true`, N SSE chunks at a fixed interval ending in `data: [DONE]` (chunked). GET
/health answers 200. Every stream is byte-identical for the same N, so bodies can be compared.

    python bench/fake_backend.py --port 9001 --chunks 50 --interval-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json

import httptools
import uvloop

BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! This is a benchmark reply."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
).encode()
JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
)
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
HEALTH = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def sse_chunk(i: int) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class Server(asyncio.Protocol):
    interval_s = 0.02
    framed: list[bytes] = []  # the stream's chunks, made once: this is an instrument

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.body = bytearray()
        self.url = b""

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        body, self.body = bytes(self.body), bytearray()
        if method == b"GET":
            self.transport.write(HEALTH)
        elif b'"stream": true' in body or b'"stream":true' in body:
            self.transport.write(SSE_HEAD)
            self.send_from(0)
        else:
            self.transport.write(JSON_HEAD + BODY)

    def send_from(self, i: int) -> None:
        """Chunk `i` after one interval, and so on: a timer callback per chunk, no task or
        future (this is an instrument; its CPU shares the machine with what it measures)."""
        asyncio.get_running_loop().call_later(self.interval_s, self.send, i)

    def send(self, i: int) -> None:
        t = self.transport
        if t.is_closing():
            return
        if i < len(self.framed):
            t.write(self.framed[i])
            self.send_from(i + 1)
        else:
            t.write(chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def expected_stream(chunks: int) -> bytes:
    return b"".join(sse_chunk(i) for i in range(chunks)) + b"data: [DONE]\n\n"


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=9001)
    p.add_argument("--chunks", type=int, default=50)
    p.add_argument("--interval-ms", type=float, default=20.0)
    args = p.parse_args()
    Server.framed = [chunked(sse_chunk(i)) for i in range(args.chunks)]
    Server.interval_s = args.interval_ms / 1000
    gc.disable()  # an instrument: its own collections would stall every stream at once
    uvloop.run(serve(args.port))


if __name__ == "__main__":
    main()
