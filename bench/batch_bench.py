"""A large batch's creation, and what it does to every other write meanwhile, side by side.

Starts its own redis-server, api and fake backend (no worker, no builder, no Docker: the
tasks stay queued) from `bench/async_bench.py`'s stack, uploads a batch input file of N chat
requests, then creates the batch (`POST /v1/batches`) while a client submits one async task
every PROBE_EVERY_S (`POST /v1/async-tasks`: a write that waits for SQLite's write lock).
A second client reads `GET /v1/models` as often (no write: it waits only for the api's
event loop). Printed: the batch's creation time, the slowest async submit while it was stored
(how long the batch held the write lock, as every other writer saw it), and the slowest read.

    .venv/bin/python bench/batch_bench.py [--lines 50000] [--rounds 3] [--plain] [--baseline REV]

`--baseline REV` runs the same on the code of git REV first, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench import async_bench
from bench.async_bench import ADMIN_KEY, COMPILED, PLAIN, ROOT, Stack, baseline_code

PROBE_EVERY_S = 0.02
HEADERS = {"authorization": f"Bearer {ADMIN_KEY}"}


def input_file(lines: int) -> bytes:
    rows = []
    for i in range(lines):
        body = {"model": "fake", "messages": [{"role": "user", "content": f"question {i}"}]}
        line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
        rows.append(json.dumps({**line, "body": {**body, "max_tokens": 16}}))
    return "\n".join(rows).encode()


class Prober(threading.Thread):
    """Sends one request every PROBE_EVERY_S (an async task's submit, or with `read` a
    request that writes nothing); keeps each one's time by when it began."""

    def __init__(self, url: str, *, read: bool = False) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.read = read
        self.times: list[tuple[float, float]] = []  # (began, seconds)
        self.done = threading.Event()

    def run(self) -> None:
        task = {"args": {"prompt": "probe", "max_tokens": 1}}
        with httpx.Client(base_url=self.url, headers=HEADERS, timeout=120) as client:
            while not self.done.is_set():
                began = time.perf_counter()
                if self.read:
                    reply = client.get("/v1/models")
                else:
                    reply = client.post("/v1/async-tasks?model_endpoint_id=end_fake", json=task)
                assert reply.status_code == 200, reply.text
                self.times.append((began, time.perf_counter() - began))
                time.sleep(PROBE_EVERY_S)

    def slowest(self, start: float, end: float) -> float:
        return max((s for began, s in self.times if start - s <= began <= end), default=0.0)


def one_run(code: Path | None, lines: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="batch-bench-") as tmp:
        stack = Stack(Path(tmp), 1, code)
        try:
            stack.start()
            stack.stop("worker")  # the tasks stay queued: only the api writes
            url = f"http://127.0.0.1:{stack.api_port}"
            data = input_file(lines)
            creates, stalls, waits = [], [], []
            with httpx.Client(base_url=url, headers=HEADERS, timeout=600) as client:
                for _ in range(rounds):
                    upload = client.post(
                        "/v1/files",
                        files={"file": ("in.jsonl", data)},
                        data={"purpose": "batch"},
                    )
                    assert upload.status_code == 200, upload.text
                    prober, reader = Prober(url), Prober(url, read=True)
                    prober.start()
                    reader.start()
                    time.sleep(0.5)
                    start = time.perf_counter()
                    batch = client.post(
                        "/v1/batches",
                        json={
                            "input_file_id": upload.json()["id"],
                            "endpoint": "/v1/chat/completions",
                            "completion_window": "24h",
                        },
                    )
                    end = time.perf_counter()
                    time.sleep(0.5)
                    for thread in (prober, reader):
                        thread.done.set()
                        thread.join()
                    assert batch.status_code == 200, batch.text
                    creates.append(end - start)
                    stalls.append(prober.slowest(start, end))
                    waits.append(reader.slowest(start, end))
        finally:
            stack.stop_all()
    return {
        "create_s": statistics.median(creates),
        "stall_s": statistics.median(stalls),
        "read_s": statistics.median(waits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="the sources, not build/compiled")
    parser.add_argument("--baseline", metavar="REV", help="also run the code of git REV, first")
    args = parser.parse_args()
    if not PLAIN and subprocess.run([str(ROOT / "scripts/compile"), "--check"]).returncode:
        sys.exit("build/compiled is missing or older than the sources: run scripts/compile")
    runs: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="batch-bench-trees-") as trees:
        if args.baseline:
            code = baseline_code(args.baseline, Path(trees))
            runs["baseline"] = one_run(code, args.lines, args.rounds)
        runs["this code"] = one_run(None if PLAIN else COMPILED, args.lines, args.rounds)
    print(
        f"{args.lines} lines a batch, median of {args.rounds} rounds; "
        f"{'plain' if PLAIN else 'compiled'} build"
        + (f"; baseline: {args.baseline}, run first" if args.baseline else "")
    )
    names = list(runs)
    print(f"{'':52}" + "".join(f"{name:>12}" for name in names))
    rows = (
        ("create_s", "POST /v1/batches, s"),
        ("stall_s", "slowest async submit while it was stored, s"),
        ("read_s", "slowest GET /v1/models meanwhile, s"),
    )
    for key, label in rows:
        line = f"{label:52}" + "".join(f"{runs[name][key]:12.2f}" for name in names)
        if args.baseline:
            line += f"   {runs['baseline'][key] / runs['this code'][key]:.1f}x less"
        print(line)


if __name__ == "__main__":
    async_bench.PLAIN = PLAIN
    main()
