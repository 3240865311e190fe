"""Real vLLM through the appliance against vLLM by hand, in one run:

- create to READY through the appliance (POST, then the status) against a bare `docker run` of
  the same image, command line, environment and limits to a passing `/health`; the goal is at
  most 1.1x + 2 s;
- generated tokens/s of 8 concurrent streams through the appliance against the same streams
  sent straight to the replica; the goal is at least 0.97x.

    .venv/bin/python bench/vllm_bench.py [--rounds 2] [--stream-rounds 3] [--pin]

Needs the Docker Engine, the vLLM CPU test image and the converted Gemma (scripts/test prepares
them). Rounds alternate (bare, appliance, appliance, bare, ...) so the VM's drifts hit both;
`--rounds 0` measures only the streams. Each stream round prints the api's CPU seconds.

Where the model computes on the CPUs (vLLM's CPU build, on this 2-core VM), every other
process that wakes takes time from its compute threads, so the streams measure the box's
contention as much as the proxy. `--pin` gives the replica (one compute thread) the first CPU
alone and puts the api, the client and Docker's port proxy on the second: as on a GPU box,
where the model runs on the accelerator and the host has cores to spare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.e2e.real_vllm import READY_TIMEOUT_S, vllm_body
from tests.harness import (
    ADMIN_KEY,
    MODELS_DIR,
    VLLM_CPU_IMAGE,
    Appliance,
    RedisServer,
    free_port,
    wait_until,
)

STREAMS = 8
STREAM_TOKENS = 128
NAME = "bench-vllm"


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def replica_of(appliance: Appliance) -> dict[str, Any]:
    """`docker inspect` of the appliance's one replica."""
    (cid,) = appliance.containers()
    out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True)
    inspected: dict[str, Any] = json.loads(out.stdout)[0]
    return inspected


def through_appliance(appliance: Appliance, **fields: Any) -> tuple[float, dict[str, Any]]:
    """Seconds from the create request to READY, and the replica's inspect."""
    client = appliance.client()
    t0 = time.monotonic()
    reply = client.post("/v1/model-endpoints", json=vllm_body(NAME, **fields))
    reply.raise_for_status()
    endpoint_id = reply.json()["endpoint_creation_task_id"]
    wait_until(
        lambda: client.get(f"/v1/model-endpoints/{endpoint_id}").json()["status"] == "READY",
        READY_TIMEOUT_S,
        "the endpoint",
        every_s=0.05,
    )
    return time.monotonic() - t0, replica_of(appliance)


def delete(appliance: Appliance) -> None:
    client = appliance.client()
    client.delete(f"/v1/llm/model-endpoints/{NAME}")
    wait_until(
        lambda: (
            not appliance.containers()
            and client.get(f"/v1/llm/model-endpoints/{NAME}").status_code == 404
        ),
        120,
        "the endpoint removed",
    )


def bare(inspected: dict[str, Any]) -> float:
    """Seconds from `docker run` of the same image, command, env and limits to /health 200."""
    config, host = inspected["Config"], inspected["HostConfig"]
    env = [e for e in config["Env"] if e.startswith(("VLLM_", "HF_"))]  # what the builder set
    port = free_port()
    cmd = ["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:8000"]
    cmd += ["-v", f"{MODELS_DIR}:/models:ro", "--shm-size", str(host["ShmSize"])]
    cmd += ["--memory", str(host["Memory"]), "--cpus", str(host["NanoCpus"] / 1e9)]
    cmd += [arg for item in env for arg in ("-e", item)]
    t0 = time.monotonic()
    cid = subprocess.run(
        [*cmd, config["Image"], *config["Cmd"]], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ok(url + "/health"), READY_TIMEOUT_S, "the bare vLLM", every_s=0.05)
        return time.monotonic() - t0
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


async def one_stream(client: httpx.AsyncClient, url: str, i: int) -> int:
    body = {
        "model": NAME,
        "prompt": f"Story number {i}: once upon a time",
        "max_tokens": STREAM_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


async def streams(url: str, headers: dict[str, str]) -> float:
    """Generated tokens/s of STREAMS concurrent streams to `url`."""
    async with httpx.AsyncClient(headers=headers, timeout=600) as client:
        t0 = time.monotonic()
        counts = await asyncio.gather(*(one_stream(client, url, i) for i in range(STREAMS)))
        elapsed = time.monotonic() - t0
    assert all(c == STREAM_TOKENS for c in counts), counts
    return sum(counts) / elapsed


def start_times(appliance: Appliance, rounds: int) -> list[tuple[float, float]]:
    """(bare, appliance) seconds per round; a first appliance start, not counted, gives the
    bare runs their command line and warms the page cache for both. No rounds: none at all."""
    if rounds == 0:
        return []
    _, inspected = through_appliance(appliance)
    delete(appliance)
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            plain = bare(inspected)
            made, inspected = through_appliance(appliance)
            delete(appliance)
        else:
            made, inspected = through_appliance(appliance)
            delete(appliance)
            plain = bare(inspected)
        pairs.append((plain, made))
        print(f"start round {i + 1}: bare {plain:.1f} s, appliance {made:.1f} s", flush=True)
    return pairs


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(cid: int | str, port: str, api: int) -> None:
    """The replica on the first CPU, alone; the api, this client and Docker's port proxy on the
    second: the model's compute then never waits on the processes that carry its streams, as
    on a GPU box, where it runs on the accelerator and the host has cores to spare."""
    subprocess.run(
        ["docker", "update", "--cpuset-cpus", "0", str(cid)], check=True, capture_output=True
    )
    host_port = port.rsplit(":", 1)[1]
    found = subprocess.run(
        ["pgrep", "-f", f"docker-proxy .*-host-port {host_port} "], capture_output=True, text=True
    )
    for pid in [api, *map(int, found.stdout.split())]:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", "1", str(pid)], check=True, capture_output=True
        )
    os.sched_setaffinity(0, {1})


def stream_rates(appliance: Appliance, rounds: int, pinned: bool) -> list[tuple[float, float]]:
    # pinned: one CPU, so one compute thread (the builder's OMP_NUM_THREADS), on the CPU it gets
    through_appliance(appliance, **({"cpus": 1} if pinned else {}))
    (cid,) = appliance.containers()
    port = subprocess.run(
        ["docker", "port", cid, "8000/tcp"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    if pinned:
        pin(cid, port, appliance.procs["api"].pid)
    direct_url, auth = f"http://{port}", {"Authorization": f"Bearer {ADMIN_KEY}"}
    own = {"Authorization": f"Bearer {appliance.replica_key(cid)}"}  # the replica's own key
    asyncio.run(streams(direct_url, own))  # warm-up, not counted
    api = appliance.procs["api"].pid
    pairs = []
    for i in range(rounds):
        order = [(direct_url, own), (appliance.url, auth)]
        rates, used = [], []
        for url, headers in order[:: 1 - 2 * (i % 2)]:
            before = cpu_s(api)
            rates.append(asyncio.run(streams(url, headers)))
            used.append(cpu_s(api) - before)
        (direct, through), (idle_cpu, busy_cpu) = (
            (rates, used) if i % 2 == 0 else (rates[::-1], used[::-1])
        )
        pairs.append((direct, through))
        print(
            f"stream round {i + 1}: direct {direct:.1f} tok/s, appliance {through:.1f} tok/s "
            f"({through / direct:.3f}x); the api's CPU: {busy_cpu:.2f} s carrying the streams, "
            f"{idle_cpu:.2f} s during the direct ones",
            flush=True,
        )
    delete(appliance)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="streams with the replica on a CPU of its own (the api, the client and the port "
        "proxy on the other), as on a GPU box; without it every process shares both CPUs",
    )
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-bench-"))
    redis = RedisServer(work / "redis").start()
    appliance = Appliance(
        work / "appliance",
        redis,
        env_extra={
            "APPLIANCE_RECONCILE_INTERVAL_S": "1",
            "APPLIANCE_VLLM_CPU_IMAGE": VLLM_CPU_IMAGE,
        },
    ).start()
    try:
        starts = start_times(appliance, options.rounds)
        rates = stream_rates(appliance, options.stream_rounds, options.pin)
    finally:
        appliance.stop()
        redis.stop()
    summary: dict[str, Any] = {}
    if starts:
        bare_s = sum(p for p, _ in starts) / len(starts)
        made_s = sum(m for _, m in starts) / len(starts)
        summary |= {
            "create_to_ready_s": {
                "bare_docker_run": round(bare_s, 1),
                "appliance": round(made_s, 1),
            },
            "start_ratio": round(made_s / bare_s, 3),
            "start_goal_s": round(1.1 * bare_s + 2, 1),
            "start_goal_met": made_s <= 1.1 * bare_s + 2,
        }
    direct = sum(d for d, _ in rates) / len(rates)
    through = sum(t for _, t in rates) / len(rates)
    summary |= {
        "tokens_per_s_8_streams": {"direct": round(direct, 1), "appliance": round(through, 1)},
        "streams_pinned": options.pin,
        "stream_ratio": round(through / direct, 3),
        "stream_ratio_median_of_rounds": round(statistics.median(t / d for d, t in rates), 3),
        "stream_goal_met": through >= 0.97 * direct,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
