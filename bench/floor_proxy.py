"""The floor of a proxy written in Python: what uvloop and its callbacks cost with no rules at
all. Each client connection gets one backend connection of its own, and bytes pass both ways
as they arrive: no parsing, no keys, no limits, no usage. Not a product: `bench/run.py --floor`
measures it beside the appliance and nginx, so the printed CPU per request splits what the
appliance's rules cost from what any Python proxy on this loop pays.

    python bench/floor_proxy.py --port 8001 --backend-port 8002
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import uvloop


class Back(asyncio.Protocol):
    def __init__(self, front: asyncio.Transport) -> None:
        self.front = front

    def data_received(self, data: bytes) -> None:
        self.front.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.close()


class Front(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.back: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        front = self.transport
        loop = asyncio.get_running_loop()
        back, _ = await loop.create_connection(lambda: Back(front), "127.0.0.1", self.backend_port)
        self.back = back
        for data in self.early:
            back.write(data)
        self.early = []

    def data_received(self, data: bytes) -> None:
        if self.back is None:
            self.early.append(data)
        else:
            self.back.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.back is not None:
            self.back.close()


async def serve(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Front(backend_port), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.port, args.backend_port))
