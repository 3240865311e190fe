"""Async tasks vs sync requests against a fake backend with a fixed latency, side by side.

Starts its own redis-server, api and worker (no builder, no Docker): one endpoint row and one
READY replica row point at a fake OpenAI backend (a separate process) that answers every
request after LATENCY. Then, in one run (after IDLE_S with nothing queued, the worker's CPU):
  1. sync: N completions through the api's /v1/completions with C clients in flight;
  2. async: N tasks through POST /v1/async-tasks (the enqueue rate is measured here), run by
     one worker process with `worker_concurrency` C; completions/s from first submit to last
     finish (read from SQLite, so polling costs nothing);
  3. the same N tasks submitted with no worker running, then drained by it (the worker's own
     rate, without the api competing for the CPU);
  4. a client polling a finished task's status (GET /v1/async-tasks/{id});
  5. a worker that runs one job at a time (what a plain RQ worker does), on a few tasks, to
     show why the runner keeps many jobs in flight.

    .venv/bin/python bench/async_bench.py [--tasks 10000] [--concurrency 64] [--plain]
                                          [--baseline REV]

The api and worker run the compiled build (build/compiled, `scripts/compile`), as the image
does; `--plain` runs the sources instead. `--baseline REV` first runs all of it on the code of
git REV (built the same way, in a temporary directory; a revision with the same database
schema), then on this code, and prints the two side by side with their ratio. Each run also
prints the api's CPU time per submitted task (from /proc), steadier than rates on a shared VM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "build/compiled"  # scripts/compile
PLAIN = "--plain" in sys.argv  # run the sources, not the compiled build
sys.path.insert(0, str(ROOT))

from appliance.db import open_engine, session_scope  # noqa: E402
from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState  # noqa: E402
from bench.stack import checkout  # noqa: E402

ADMIN_KEY = "mea_000000000001_benchadminkeybenchadminkey0"
LATENCY_S = 0.2
SUBMITTERS = 32  # clients posting tasks at once
POLLS = 2000  # status reads of one task
IDLE_S = 10  # the worker's CPU measured with nothing queued


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_backend(port: int, latency_s: float) -> None:
    """The fake replica: every completion answers after `latency_s`."""

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(latency_s)
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": "fake",
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/completions", answer)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class Stack:
    """redis-server, fake backend, api and worker as child processes in a temp dir."""

    def __init__(self, workdir: Path, concurrency: int, code: Path | None) -> None:
        self.workdir = workdir
        self.code = code  # put first on the path: a compiled build; None: the sources
        self.data_dir = workdir / "data"
        self.redis_port, self.api_port, self.backend_port = free_port(), free_port(), free_port()
        self.concurrency = concurrency
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.api_cpu_us: list[float] = []  # per submitted task, each submit_tasks call

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(
            {
                "APPLIANCE_DATA_DIR": str(self.data_dir),
                "APPLIANCE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "APPLIANCE_PORT": str(self.api_port),
                "APPLIANCE_ADMIN_KEY": ADMIN_KEY,
                "APPLIANCE_LOG_LEVEL": "WARNING",
                "APPLIANCE_WORKER_CONCURRENCY": str(self.concurrency),
                "APPLIANCE_REPLICA_MAX_CONCURRENCY": "4096",
                "APPLIANCE_SWEEP_INTERVAL_S": "2",
                **extra,
            }
        )
        return env

    def spawn(self, name: str, cmd: list[str], **env: str) -> None:
        """The appliance's processes run the compiled build (build/compiled, as the image
        and the tests do) from a directory that is not the source tree, which `-m` would put
        first on the path; `--plain` runs the sources."""
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        full = self.env(**env)
        if self.code is not None:
            full["PYTHONPATH"] = str(self.code)
        self.procs[name] = subprocess.Popen(
            cmd, env=full, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )

    def start(self) -> None:
        self.spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
        )
        self.spawn("backend", [sys.executable, __file__, "--serve-backend", str(self.backend_port)])
        self.spawn("api", [sys.executable, "-m", "appliance", "api"])
        wait_http(f"http://127.0.0.1:{self.api_port}/healthz")
        wait_http(f"http://127.0.0.1:{self.backend_port}/health")
        self.seed()
        self.start_worker(self.concurrency)
        time.sleep(3)  # the api's and worker's routing tables pick up the endpoint

    def start_worker(self, concurrency: int) -> None:
        self.stop("worker")
        self.spawn(
            "worker",
            [sys.executable, "-m", "appliance", "worker"],
            APPLIANCE_WORKER_CONCURRENCY=str(concurrency),
        )

    def seed(self) -> None:
        engine = open_engine(self.data_dir / "appliance.db")
        with session_scope(engine) as session:
            session.add(
                Endpoint(
                    id="end_fake",
                    name="fake",
                    owner="admin",
                    created_by="bench",
                    framework="vllm",
                    model="org/model",
                    endpoint_type="async",
                    status=EndpointStatus.READY,
                )
            )
            session.add(
                Replica(
                    id="rep_fake",
                    endpoint_id="end_fake",
                    generation=1,
                    container_name="fake",
                    address=f"http://127.0.0.1:{self.backend_port}",
                    state=ReplicaState.READY,
                )
            )
        engine.dispose()

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stop_all(self) -> None:
        for name in ["worker", "api", "backend", "redis"]:
            self.stop(name)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "appliance.db", timeout=30)


def wait_http(url: str, timeout_s: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer")


async def run_clients(n: int, clients: int, call: Any) -> float:
    """Make `n` calls with `clients` in flight; returns the seconds it took."""
    counter = iter(range(n))

    async def client() -> None:
        for i in counter:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


def session(stack: Stack) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=f"http://127.0.0.1:{stack.api_port}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        connector=aiohttp.TCPConnector(limit=0),
    )


async def bench_sync(stack: Stack, n: int, concurrency: int) -> float:
    async with session(stack) as http:

        async def call(i: int) -> None:
            async with http.post(
                "/v1/completions", json={"model": "fake", "prompt": str(i), "max_tokens": 4}
            ) as r:
                await r.read()
                assert r.status == 200, r.status

        return n / await run_clients(n, concurrency, call)


def cpu_s(pid: int) -> float:
    """The CPU seconds process `pid` has used (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def submit_tasks(stack: Stack, n: int) -> tuple[float, float]:
    """Submit `n` tasks; returns (wall time it started, seconds the submits took). The api's
    CPU time per task is added to `stack.api_cpu_us`."""
    api = stack.procs["api"].pid
    used = cpu_s(api)
    try:
        return await _submit_tasks(stack, n)
    finally:
        stack.api_cpu_us.append((cpu_s(api) - used) * 1e6 / n)


async def _submit_tasks(stack: Stack, n: int) -> tuple[float, float]:
    async with session(stack) as http:

        async def call(i: int) -> None:
            async with http.post(
                "/v1/async-tasks?model_endpoint_id=end_fake",
                json={"args": {"prompt": str(i), "max_tokens": 4}},
            ) as r:
                await r.read()
                assert r.status == 200, r.status

        began = time.time()
        return began, await run_clients(n, SUBMITTERS, call)


def wait_done(stack: Stack, expected: int, timeout_s: float) -> tuple[int, float, float]:
    """Poll SQLite until `expected` tasks ended; (successes, first started, last finished)."""
    deadline = time.monotonic() + timeout_s
    with stack.db() as db:
        while time.monotonic() < deadline:
            ended = db.execute(
                "SELECT COUNT(*) FROM task WHERE status IN ('SUCCESS', 'FAILURE')"
            ).fetchone()[0]
            if ended >= expected:
                break
            time.sleep(0.5)
        ok, first, last = db.execute(
            "SELECT SUM(status = 'SUCCESS'), MIN(started_at), MAX(finished_at) FROM task"
        ).fetchone()
        db.execute("DELETE FROM task")
    return int(ok or 0), float(first or 0), float(last or 0)


def bench_async(stack: Stack, n: int) -> dict[str, float]:
    began, submit_s = asyncio.run(submit_tasks(stack, n))
    ok, first_started, last_finished = wait_done(stack, n, timeout_s=max(120, n / 5))
    return {
        "ok": ok,
        "enqueue_per_s": n / submit_s,
        "completions_per_s": n / (last_finished - began),
        "worker_per_s": n / (last_finished - first_started),
    }


async def bench_polls(stack: Stack, n: int) -> tuple[float, float]:
    """`n` GETs of one finished task's status, 8 clients in flight (a client polling its tasks,
    as llmengine's `get_async_task` does); returns (polls/s, the api's CPU us per poll)."""
    async with session(stack) as http:
        async with http.post(
            "/v1/async-tasks?model_endpoint_id=end_fake",
            json={"args": {"prompt": "poll", "max_tokens": 4}},
        ) as r:
            task_id = (await r.json())["task_id"]
        for _ in range(600):  # the worker runs it in about LATENCY
            async with http.get(f"/v1/async-tasks/{task_id}") as r:
                if (await r.json())["status"] == "SUCCESS":
                    break
            await asyncio.sleep(0.05)

        async def call(i: int) -> None:
            async with http.get(f"/v1/async-tasks/{task_id}") as r:
                await r.read()
                assert r.status == 200, r.status

        api = stack.procs["api"].pid
        used = cpu_s(api)
        seconds = await run_clients(n, 8, call)
        return n / seconds, (cpu_s(api) - used) * 1e6 / n


def baseline_code(revision: str, workdir: Path) -> Path:
    """The code of git `revision`: its compiled build, or with `--plain` its sources."""
    tree = checkout(revision, workdir, compiled=not PLAIN)
    return tree if PLAIN else tree / "build/compiled"


def run_all(code: Path | None, n: int, c: int, serial_tasks: int) -> dict[str, float]:
    """Every figure of one run, on the build at `code` (None: the sources)."""
    with tempfile.TemporaryDirectory(prefix="async-bench-") as tmp:
        stack = Stack(Path(tmp), c, code)
        try:
            stack.start()
            worker = stack.procs["worker"].pid
            used = cpu_s(worker)
            time.sleep(IDLE_S)
            idle_worker = 100 * (cpu_s(worker) - used) / IDLE_S
            asyncio.run(bench_sync(stack, min(200, n), c))  # warm-up
            sync_rate = asyncio.run(bench_sync(stack, n, c))
            result = bench_async(stack, n)
            stack.stop("worker")  # now submit with no worker competing, then drain
            _, submit_alone_s = asyncio.run(submit_tasks(stack, n))
            stack.start_worker(c)
            ok, first_started, last_finished = wait_done(stack, n, timeout_s=max(120, n / 5))
            drain_ok, drain = ok, n / (last_finished - first_started)
            polls, poll_cpu_us = asyncio.run(bench_polls(stack, POLLS))
            stack.start_worker(1)
            time.sleep(3)
            serial = bench_async(stack, serial_tasks)
        finally:
            stack.stop_all()
    return {
        "idle_worker": idle_worker,
        "sync": sync_rate,
        "async": result["completions_per_s"],
        "async_ok": result["ok"],
        "ratio": result["completions_per_s"] / sync_rate,
        "enqueue": result["enqueue_per_s"],
        "api_cpu_us": stack.api_cpu_us[0],
        "worker": result["worker_per_s"],
        "enqueue_alone": n / submit_alone_s,
        "api_cpu_us_alone": stack.api_cpu_us[1],
        "drain": drain,
        "drain_ok": drain_ok,
        "polls": polls,
        "poll_cpu_us": poll_cpu_us,
        "serial": serial["completions_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serial-tasks", type=int, default=25)
    parser.add_argument("--plain", action="store_true", help="the sources, not build/compiled")
    parser.add_argument("--baseline", metavar="REV", help="also run the code of git REV, first")
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend, LATENCY_S)
        return
    n, c = args.tasks, args.concurrency
    if not PLAIN and subprocess.run([str(ROOT / "scripts/compile"), "--check"]).returncode:
        sys.exit("build/compiled is missing or older than the sources: run scripts/compile")
    if not PLAIN and not COMPILED.exists():
        sys.exit("no build/compiled: run scripts/compile (or pass --plain)")
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="async-bench-trees-") as trees:
        if args.baseline:
            runs["baseline"] = run_all(
                baseline_code(args.baseline, Path(trees)), n, c, args.serial_tasks
            )
        runs["this code"] = run_all(None if PLAIN else COMPILED, n, c, args.serial_tasks)
    report(runs, n, c, args.serial_tasks, args.baseline)


ROWS = (  # key, label, format
    ("idle_worker", "the worker's CPU with no task to run, % of a core", "{:.1f}"),
    ("sync", "sync  completions/s  ({n} requests, {c} clients)", "{:.1f}"),
    ("async", "async completions/s  ({n} tasks, worker_concurrency {c})", "{:.1f}"),
    ("ratio", "async / sync", "{:.2f}x"),
    ("enqueue", "enqueue rate (POST /v1/async-tasks, {s} clients), /s", "{:.1f}"),
    ("api_cpu_us", "  the api's CPU per submitted task, us", "{:.0f}"),
    ("worker", "worker throughput (first start to last finish), /s", "{:.1f}"),
    ("enqueue_alone", "enqueue rate, no worker running, /s", "{:.1f}"),
    ("api_cpu_us_alone", "  the api's CPU per submitted task, us", "{:.0f}"),
    ("drain", "drain of {n} queued tasks (worker_concurrency {c}), /s", "{:.1f}"),
    ("polls", "GET /v1/async-tasks/{{id}} of a finished task (8 clients), /s", "{:.1f}"),
    ("poll_cpu_us", "  the api's CPU per GET, us", "{:.0f}"),
    ("serial", "one job at a time (worker_concurrency 1, {t} tasks), /s", "{:.1f}"),
)


def report(
    runs: dict[str, dict[str, float]], n: int, c: int, serial_tasks: int, baseline: str | None
) -> None:
    print(
        f"fake backend: {LATENCY_S * 1000:.0f} ms per request; {c} in flight; "
        f"ideal {c / LATENCY_S:.0f}/s; {os.cpu_count()} CPUs; "
        f"{'plain' if PLAIN else 'compiled'} build"
        + (f"; baseline: {baseline}, run first" if baseline else "")
    )
    names = list(runs)
    head = f"{'':62}" + "".join(f"{name:>12}" for name in names)
    print(head + ("       ratio" if baseline else ""))
    for key, label, form in ROWS:
        cells = [form.format(runs[name][key]) for name in names]
        line = f"{label.format(n=n, c=c, s=SUBMITTERS, t=serial_tasks):62}"
        line += "".join(f"{cell:>12}" for cell in cells)
        if baseline and runs["baseline"][key]:
            line += f"{runs['this code'][key] / runs['baseline'][key]:11.2f}x"
        print(line)
    for name, run in runs.items():
        if run["async_ok"] != n or run["drain_ok"] != n:
            print(f"{name}: {run['async_ok']:.0f} and {run['drain_ok']:.0f} of {n} SUCCESS")


if __name__ == "__main__":
    main()
