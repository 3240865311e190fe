"""The data plane's benchmark: the same load, in one run, sent directly to a fake OpenAI
backend, through the appliance (one api worker, and two), through nginx (`proxy_buffering
off`; one worker, and two) and through LiteLLM's proxy; prints added latency, peak
requests/s and ratios, and stream gaps, the peak and stream runs repeated with the targets
interleaved (medians printed); stream rounds run with the proxy under test on a CPU of its
own and the load on the others (`Stack.pinned`). Not a pytest test.

    .venv/bin/python bench/run.py            # all of it, about seven minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # shorter runs
    .venv/bin/python bench/run.py --general  # also the appliance with its fast lane off
    .venv/bin/python bench/run.py --plain    # also the appliance without its compiled modules
    .venv/bin/python bench/run.py --baseline REV  # also the appliance built from git REV
    .venv/bin/python bench/run.py --floor    # also a Python proxy with no rules at all

Needs `wrk` and `nginx` (apt) and, for the LiteLLM column, litellm[proxy]==1.108.0 in its own
venv (LITELLM_PYTHON, default /tmp/venv-litellm/bin/python); see bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fake_backend import expected_stream
from bench.stack import ADMIN_KEY, LITELLM_KEY, MODEL, ROOT, Stack, checkout, have

HERE = Path(__file__).resolve().parent
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
STREAM_CHUNKS = 50
STREAM_INTERVAL_MS = 20.0  # 50 chunks/s
STREAM_BODY = json.dumps(
    {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Count."}]}
).encode()


def key_for(url: str) -> str:
    return LITELLM_KEY if url.endswith("#litellm") else ADMIN_KEY


def wrk(url: str, connections: int, seconds: float) -> dict[str, float]:
    """Runs wrk with bench/post.lua; requests/s, p50 and p99 latency in seconds, errors."""
    cmd = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        "-s",
        str(HERE / "post.lua"),
        url.split("#")[0],
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, BENCH_KEY=key_for(url)),
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
        result[f"p{pct}"] = float(value) * UNITS[unit]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    result["non2xx"] = float(bad.group(1)) if bad else 0.0
    result["socket_errors"] = 1.0 if errors else 0.0
    return result


class StreamClient(asyncio.Protocol):
    """One streaming request on its own connection, read with httptools: the time each SSE
    event arrives is taken as its bytes reach the client's loop. An instrument as light as
    the fake backend, so that its own CPU weighs as little as possible on the figures."""

    def __init__(self, request: bytes, done: asyncio.Future[tuple[bytes, list[float]]]) -> None:
        self.request = request
        self.done = done
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.gaps: list[float] = []
        self.last = 0.0
        self.scan = 0
        self.now = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.now = time.perf_counter()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(exc)

    def on_body(self, body: bytes) -> None:
        self.body += body
        at = self.scan  # where the next event's end may begin ("\n\n" may span two reads)
        while (end := self.body.find(b"\n\n", at)) >= 0:
            if self.last:
                self.gaps.append(self.now - self.last)
            self.last = self.now
            at = end + 2
        self.scan = max(at, len(self.body) - 1)

    def on_message_complete(self) -> None:
        self._end(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(exc or ConnectionError("closed before the reply ended"))

    def _end(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if exc is not None:
            self.done.set_exception(exc)
        else:
            self.done.set_result((bytes(self.body), self.gaps))
        self.transport.close()


async def one_stream(url: str) -> tuple[bytes, list[float]]:
    """The body and the gaps between its SSE events' arrivals."""
    parts = urlsplit(url.split("#")[0])
    request = (
        f"POST {parts.path} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        f"authorization: Bearer {key_for(url)}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode() + STREAM_BODY
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[bytes, list[float]]] = loop.create_future()
    await loop.create_connection(lambda: StreamClient(request, done), parts.hostname, parts.port)
    return await asyncio.wait_for(done, 120)


async def streams(url: str, concurrency: int) -> tuple[dict[str, float], list[float]]:
    """One round: figures of its `concurrency` streams, and all their gaps, sorted."""
    gc.disable()  # a collection in this client would stall every stream at once and be the p99
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(url) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        gc.enable()
    expected = expected_stream(STREAM_CHUNKS)
    gaps = sorted(g for _, g_list in results for g in g_list)
    identical = sum(body == expected for body, _ in results)
    return {
        "identical": identical,
        "streams": len(results),
        "gap_p50": gaps[len(gaps) // 2],
        "gap_p99": p99(gaps),
        "gap_mean": statistics.fmean(gaps),
        "wall": wall,
    }, gaps


def p99(ordered: list[float]) -> float:
    return ordered[int(len(ordered) * 0.99)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--rounds", type=int, default=9, help="peak runs per target, interleaved")
    p.add_argument("--peak-seconds", type=int, default=2, help="length of one peak run")
    p.add_argument("--stream-rounds", type=int, default=15, help="stream runs per target")
    p.add_argument(
        "--general", action="store_true", help="add the appliance with its fast lane off"
    )
    p.add_argument(
        "--plain", action="store_true", help="add the appliance without its compiled modules"
    )
    p.add_argument(
        "--floor",
        action="store_true",
        help="add a Python proxy with no rules (bench/floor_proxy.py): the floor of the loop",
    )
    p.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="stream rounds without the proxy on a CPU of its own (Stack.pinned)",
    )
    p.add_argument(
        "--baseline",
        metavar="REVISION",
        help="add the appliance built from this git revision (compiled), to compare against",
    )
    args = p.parse_args()
    seconds = 3 if args.quick else 5
    for tool in ("wrk", "nginx"):
        if not have(tool):
            sys.exit(f"{tool} is missing: apt-get install -y {tool}")
    # the working tree's compiled build, made again if any source changed since (else it would
    # measure an older build without a word): a no-op when it is current
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(ROOT / "scripts/compile")], cwd=ROOT, env=env, check=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        stack = Stack(Path(tmp))
        try:
            backend = stack.backend(STREAM_CHUNKS, STREAM_INTERVAL_MS)
            targets = {
                "direct": backend,
                "appliance": stack.appliance(backend),
                "appliance x2": stack.appliance(backend, workers=2),
                "nginx": stack.nginx(backend),
                "nginx x2": stack.nginx(backend, workers=2),
            }
            if args.plain:
                targets["plain"] = stack.appliance(backend, plain=True)
            if args.baseline:
                tree = checkout(args.baseline, stack.workdir)
                targets["baseline"] = stack.appliance(backend, tree=tree)
            if args.general:
                targets["general"] = stack.appliance(backend, fast_lane=False)
            if args.floor:
                targets["floor"] = stack.floor(backend)
            litellm = None if args.no_litellm else stack.litellm(backend)
            if litellm is not None:
                targets["litellm"] = litellm
            report(
                stack,
                targets,
                seconds,
                args.peak_seconds,
                args.streams,
                args.rounds,
                args.stream_rounds,
                args.pin,
            )
        finally:
            stack.stop()


def report(
    stack: Stack,
    targets: dict[str, int],
    seconds: float,
    peak_seconds: int,
    concurrency: int,
    rounds: int,
    stream_rounds: int,
    pin: bool,
) -> None:
    """Each measurement runs with the other proxies stopped (`Stack.alone`); with `pin`, the
    stream rounds run with the proxy and the load on CPUs of their own (`Stack.pinned`)."""
    urls = {n: f"http://127.0.0.1:{port}/v1/chat/completions" for n, port in targets.items()}
    if "litellm" in urls:
        urls["litellm"] += "#litellm"  # marks which key to send; cut before use
    extra = ("plain", "general", "baseline")
    proxies = [n for n in urls if n.startswith("appliance") or n in extra]
    for url in urls.values():  # warm up pools and caches
        wrk(url, 4, 1)
    print(f"== latency at concurrency 1 ({seconds} s each, wrk) ==")
    lat = {}
    for n, u in urls.items():
        with stack.alone(targets[n]):
            lat[n] = wrk(u, 1, seconds)
    for n, r in lat.items():
        added = (
            ""
            if n == "direct"
            else (
                f"   added p50 {ms(r['p50'] - lat['direct']['p50'])}, "
                f"p99 {ms(r['p99'] - lat['direct']['p99'])}"
            )
        )
        print(f"{n:>12}: p50 {ms(r['p50'])}  p99 {ms(r['p99'])}{added}")
    print(
        f"== peak non-streaming requests/s (64 connections, {peak_seconds} s each, wrk; "
        f"{rounds} rounds, targets interleaved, median) =="
    )
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in urls}
    for _ in range(rounds):  # interleaved, so a noisy moment hits every target alike
        for n, u in urls.items():
            proxy = targets[n] in stack.proxies
            with stack.alone(targets[n]):
                before = stack.cpu_seconds(targets[n]) if proxy else (0.0, 0.0)
                result = wrk(u, 64, peak_seconds)
                after = stack.cpu_seconds(targets[n]) if proxy else (0.0, 0.0)
            # the proxy's CPU per request, from its processes' times (/proc, 10 ms ticks)
            served = max(result["rps"] * peak_seconds, 1.0)
            result["user_us"] = (after[0] - before[0]) / served * 1e6
            result["sys_us"] = (after[1] - before[1]) / served * 1e6
            result["cpu_us"] = result["user_us"] + result["sys_us"]
            runs[n].append(result)
    peak = {n: statistics.median(r["rps"] for r in rs) for n, rs in runs.items()}
    for n, rs in runs.items():
        every = " ".join(f"{r['rps']:.0f}" for r in rs)
        bad = sum(r["non2xx"] for r in rs)
        cpu = (
            f"  CPU {statistics.median(r['cpu_us'] for r in rs):.1f} us/request "
            f"(user {statistics.median(r['user_us'] for r in rs):.1f}, "
            f"kernel {statistics.median(r['sys_us'] for r in rs):.1f})"
            if targets[n] in stack.proxies
            else ""
        )
        print(f"{n:>12}: {peak[n]:9.0f} req/s{cpu}  (runs {every}; non-2xx {bad:.0f})")
    if "floor" in peak:
        print(f"floor / nginx   = {peak['floor'] / peak['nginx']:.2f}  (a proxy with no rules)")
    for n in proxies:
        print(f"{n} / nginx   = {peak[n] / peak['nginx']:.2f}  (goal >= 1)")
        if n == "appliance x2":
            print(f"{n} / nginx x2 = {peak[n] / peak['nginx x2']:.2f}")
        if "litellm" in peak:
            print(f"{n} / litellm = {peak[n] / peak['litellm']:.2f}  (goal >= 3)")
    if "baseline" in peak:
        pairs = zip(runs["appliance"], runs["baseline"], strict=True)  # run next to each other
        ratios = [a["rps"] / b["rps"] for a, b in pairs]
        print(
            f"appliance / baseline = {peak['appliance'] / peak['baseline']:.2f}  (median of "
            f"paired runs {statistics.median(ratios):.2f}; CPU per request "
            f"{statistics.median(r['cpu_us'] for r in runs['appliance']):.1f} us against "
            f"{statistics.median(r['cpu_us'] for r in runs['baseline']):.1f})"
        )
    print(
        f"== {concurrency} concurrent streams, {STREAM_CHUNKS} chunks at "
        f"{1000 / STREAM_INTERVAL_MS:.0f}/s (httptools client on uvloop; {stream_rounds} rounds, "
        f"interleaved; p99 of every gap of every round; "
        f"{'proxy on a CPU of its own, load on the rest' if pin else 'not pinned'}) =="
    )
    names = ["direct", *proxies, "nginx"]
    tries: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    gaps: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(stream_rounds):  # interleaved too: the client's loop sets much of the p99
        for n in names:
            with stack.alone(targets[n]), stack.pinned(targets[n]) if pin else nullcontext():
                figures, round_gaps = uvloop.run(streams(urls[n], concurrency))
            tries[n].append(figures)
            gaps[n].extend(round_gaps)
    streamed = {
        n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in tries.items()
    }
    pooled = {n: p99(sorted(g)) for n, g in gaps.items()}
    for n, r in streamed.items():
        every = " ".join(f"{t['gap_p99'] * 1000:.1f}" for t in tries[n])
        identical = sum(t["identical"] for t in tries[n])
        print(
            f"{n:>12}: gap p50 {ms(r['gap_p50'])}  p99 {ms(pooled[n])}  "
            f"(p99 per round {every}; median {r['gap_p99'] * 1000:.1f})  "
            f"byte-identical {identical:.0f}/{concurrency * stream_rounds}  wall {r['wall']:.2f} s"
        )
    for n in [*proxies, "nginx"]:
        gap = pooled[n] - pooled["direct"]
        median = streamed[n]["gap_p99"] - streamed["direct"]["gap_p99"]
        goal = "  (goal < 5 ms)" if n != "nginx" else ""
        print(
            f"{n} added p99 inter-chunk gap = {ms(gap)}{goal}; "
            f"median of per-round p99s: {ms(median)}"
        )


if __name__ == "__main__":
    main()
