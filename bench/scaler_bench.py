"""Scaler benchmark: how long a burst waits for a new replica, and a request after scale to
zero, against a bare container of the same model started by hand, in one run.

    .venv/bin/python bench/scaler_bench.py

Needs the Docker Engine, the test images and the Gemma file (scripts/test prepares them).
Prints the times and the ratios to the bare start; the goal is within 1.2x plus 5 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.harness import (
    GEMMA_FILE,
    LLAMACPP_IMAGE,
    MODELS_DIR,
    Appliance,
    RedisServer,
    free_port,
    wait_until,
)

CHAT = {"max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}
ROUNDS = 3


def bare_start() -> tuple[float, float]:
    """(seconds to /health 200, seconds to a first chat answer) for `docker run` by hand."""
    port = free_port()
    t0 = time.monotonic()
    cid = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "-p",
            f"127.0.0.1:{port}:8080",
            "-v",
            f"{MODELS_DIR}:/models:ro",
            LLAMACPP_IMAGE,
            "-m",
            f"/models/{GEMMA_FILE}",
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
            "--jinja",
            "--parallel",
            "1",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ok(url + "/health"), 120, "the bare container", every_s=0.05)
        ready = time.monotonic() - t0
        reply = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=120)
        reply.raise_for_status()
        return ready, time.monotonic() - t0
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _create(client: httpx.Client, body: dict[str, object]) -> str:
    reply = client.post(
        "/v1/model-endpoints",
        json={
            "model_name": "gemma",
            "inference_framework": "llamacpp",
            "checkpoint_path": GEMMA_FILE,
            "labels": {},
            "metadata": {},
            **body,
        },
    )
    reply.raise_for_status()
    return str(reply.json()["endpoint_creation_task_id"])


def _state(client: httpx.Client, endpoint_id: str) -> dict[str, int]:
    body = client.get(f"/v1/model-endpoints/{endpoint_id}").json()
    return {
        "ready": body["deployment_state"]["available_workers"],
        "desired": body["deployment_state"]["desired_workers"],
        "generation_ready": int(body["status"] == "READY"),
    }


def burst_to_new_replica(appliance: Appliance) -> float:
    """Seconds from the first request of a burst to a second replica serving."""
    client = appliance.client()
    eid = _create(
        client,
        {
            "name": f"burst{time.monotonic_ns()}",
            "min_workers": 1,
            "max_workers": 2,
            "per_worker": 1,
        },
    )
    wait_until(lambda: _state(client, eid)["generation_ready"], 120, "the endpoint")
    stop = threading.Event()
    name = client.get(f"/v1/model-endpoints/{eid}").json()["name"]

    def load() -> None:
        worker = appliance.client()
        while not stop.is_set():
            worker.post("/v1/chat/completions", json={**CHAT, "model": name, "max_tokens": 64})

    t0 = time.monotonic()
    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: _state(client, eid)["ready"] == 2, 180, "a second replica", every_s=0.05)
        return time.monotonic() - t0
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
        client.delete(f"/v1/model-endpoints/{eid}")


def first_request_after_zero(appliance: Appliance) -> float:
    client = appliance.client()
    name = f"zero{time.monotonic_ns()}"
    eid = _create(
        client,
        {
            "name": name,
            "min_workers": 0,
            "max_workers": 1,
            "per_worker": 1,
            "idle_timeout_seconds": 2,
        },
    )
    wait_until(
        lambda: _state(client, eid)["desired"] == 0 and not appliance.containers(),
        120,
        "scale to zero",
    )
    t0 = time.monotonic()
    reply = client.post("/v1/chat/completions", json={**CHAT, "model": name})
    reply.raise_for_status()
    elapsed = time.monotonic() - t0
    client.delete(f"/v1/model-endpoints/{eid}")
    wait_until(lambda: not appliance.containers(), 60, "cleanup")
    return elapsed


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="scaler-bench-"))
    redis = RedisServer(work / "redis").start()
    appliance = Appliance(
        work / "appliance", redis, env_extra={"APPLIANCE_RECONCILE_INTERVAL_S": "1"}
    ).start()
    rows = []
    try:
        for _ in range(ROUNDS):
            bare_ready, bare_first = bare_start()
            burst = burst_to_new_replica(appliance)
            cold = first_request_after_zero(appliance)
            rows.append((bare_ready, bare_first, burst, cold))
    finally:
        appliance.stop()
        redis.stop()
    print("round  bare-ready  bare-first-answer  burst->new-replica  first-request-after-zero")
    for i, (ready, first, burst, cold) in enumerate(rows, 1):
        print(f"{i:5d}  {ready:9.2f}s  {first:16.2f}s  {burst:17.2f}s  {cold:23.2f}s")
    med = [sorted(col)[len(col) // 2] for col in zip(*rows, strict=True)]
    print(
        json.dumps(
            {
                "median_s": dict(
                    zip(("bare_ready", "bare_first", "burst", "cold"), med, strict=True)
                ),
                "burst_vs_bare_ready": round(med[2] / med[0], 2),
                "burst_goal_s": round(1.2 * med[0] + 5, 2),
                "cold_vs_bare_first": round(med[3] / med[1], 2),
                "cold_goal_s": round(1.2 * med[1] + 5, 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
