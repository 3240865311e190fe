"""What one request costs the appliance's own code on the fast lane (`api/lane/front.py`, the
inference core in `api/inference/`, `forwarder/relay.py` and `forwarder/upstream.py`), with no
sockets, uvloop I/O or other processes: a `FrontProtocol` and a pooled upstream `Connection` on
fake transports, fed a chat completion request and its replica's reply, in a loop. Timings on a
shared VM drift; instruction counts do not, so `--instructions` runs this twice under
valgrind's callgrind and prints the instructions per request (the difference of the two runs,
so start-up cancels out; with a fixed hash seed, since dict probes vary with it). Not a pytest
test.

    .venv/bin/python bench/lane_cost.py                  # microseconds per request
    .venv/bin/python bench/lane_cost.py --instructions   # instructions per request (valgrind)
    PYTHONPATH=build/compiled .venv/bin/python bench/lane_cost.py --instructions  # compiled

It runs the source tree's plain Python, or with `PYTHONPATH=build/compiled` the compiled build
(`scripts/compile`). The key, endpoint and replica are made in memory (no SQLite, no Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvloop

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH
from api.callers import Keys
from api.inference.call import Core
from api.lane import front
from api.main import settle_collector
from appliance import build
from appliance.keys import Caller, KeyLimits
from forwarder.proxy import Forwarder
from forwarder.table import RoutingTable, Target, TargetReplica
from forwarder.upstream import Connection

ADDRESS = "http://127.0.0.1:9"
BODY = b'{"model":"bench","messages":[{"role":"user","content":"Say hi."}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"Authorization: Bearer key\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
)
REPLY_BODY = (
    b'{"id":"x","object":"chat.completion","created":1,"model":"bench","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}'
)
REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
    len(REPLY_BODY),
    REPLY_BODY,
)


class FakeTransport:
    """Counts writes; always open and reading."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


async def run(requests: int, rounds: int) -> float:
    """The best microseconds per request of `rounds` loops of `requests`."""
    forwarder = Forwarder()
    await forwarder.start()
    target = Target(
        "e1", "bench", "team", False, "vllm", "sync", "READY", (TargetReplica("r1", ADDRESS),)
    )
    forwarder.update(RoutingTable({"bench": target}, {"e1": target}))
    caller = Caller("k1", "user", "team", frozenset({"inference"}), True, KeyLimits())
    keys = Keys(lambda key: caller)
    keys.entries["key"] = (time.monotonic() + 1e9, caller)  # fresh for the whole run
    state: Any = SimpleNamespace(
        key_cache=keys,
        forwarder=forwarder,
        limiter=None,
        settings=SimpleNamespace(
            max_body_bytes=1 << 20,
            max_body_bytes_in_flight=1 << 30,
            cors_origins=[],
            activation_timeout_s=1,
            stream_keepalive_s=5,
        ),
    )
    app: Any = SimpleNamespace(state=SimpleNamespace(inference=Core(state)))
    server_state: Any = SimpleNamespace(
        connections=set(),
        default_headers=[(b"date", b"Fri, 27 Nov 2026 14:00:00 GMT"), (b"server", b"uvicorn")],
        total_requests=0,
    )
    config: Any = SimpleNamespace(timeout_keep_alive=5)
    make = front.front_protocol(app)
    client = make(config, server_state, {}, asyncio.get_running_loop())
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    upstream = Connection(forwarder.pool, ADDRESS)
    upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    forwarder.pool.put(upstream)  # idle in the pool; each reply puts it back
    settle_collector()  # as the api once started
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            client.data_received(REQUEST)
            upstream.data_received(REPLY)
        best = min(best, (time.perf_counter() - started) / requests * 1e6)
    await forwarder.close()
    if client_transport.writes != requests * rounds or client.call is not None:
        sys.exit("the lane did not answer every request: nothing measured")
    return best


def instructions(requests: int) -> int:
    """Instructions of one run of `requests`, counted by callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--requests",
                str(requests),
                "--rounds",
                "1",
            ],
            check=True,
            capture_output=True,
            # string and bytes hashes, so dict probes, vary with the seed: about +-2k a request
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert found is not None, "callgrind wrote no totals"
        return int(found[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--instructions", action="store_true", help="count them with callgrind")
    args = p.parse_args()
    kind = build.describe()
    if args.instructions:
        few, many = 1000, 5000
        per_request = (instructions(many) - instructions(few)) / (many - few)
        print(f"{kind}: {per_request:,.0f} instructions per request (callgrind)")
        return
    best = uvloop.run(run(args.requests, args.rounds))
    print(f"{kind}: {best:.2f} us per request (best of {args.rounds} x {args.requests})")


if __name__ == "__main__":
    main()
