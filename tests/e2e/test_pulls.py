"""Image pulls in the background, for real: a registry on loopback (Debian's docker-registry)
behind a throttling proxy serves a llama.cpp image with a large layer of its own; the builder
pulls it while it keeps every other endpoint going, shows the progress, survives its own
restart mid-pull, and ends a failed pull in UPDATE_FAILED with the registry's words."""

from __future__ import annotations

import json
import os
import signal
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from appliance import bus
from tests.e2e.lifecycle import describe, wait_status
from tests.harness import GEMMA_FILE, Appliance, wait_until
from tests.registry import (
    PAD_BYTES,
    Registry,
    ThrottleProxy,
    have_registry,
    push_padded_image,
    remove_image,
)

SLOW_BPS = 400_000  # the padded layer takes ~2 minutes at this rate: longer than B's checks
FAST_BPS = 200_000_000
READY_WITHIN_S = 90
TICK_S = 1.0  # the harness's APPLIANCE_RECONCILE_INTERVAL_S
BASE = "appliance-test/llama.cpp:server"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    why = have_registry()
    if why is not None:
        if os.environ.get("APPLIANCE_TEST_REQUIRE_DOCKER") == "1":
            pytest.fail(why)  # scripts/test installs it: missing there is a failure
        pytest.skip(why)
    server = Registry(tmp_path_factory.mktemp("registry")).start()
    yield server
    server.stop()


@pytest.fixture
def proxy(registry: Registry) -> Iterator[ThrottleProxy]:
    throttle = ThrottleProxy(registry.port, SLOW_BPS).start()
    yield throttle
    throttle.stop()


@pytest.fixture
def slow_image(
    registry: Registry, proxy: ThrottleProxy, tmp_path: Path, docker_ready: None
) -> Iterator[str]:
    """A llama.cpp image only the registry has, named through the slow proxy."""
    reference = f"{proxy.address}/{push_padded_image(registry, BASE, tmp_path / 'image')}"
    yield reference
    remove_image(reference)


def gemma(name: str, **fields: object) -> dict[str, Any]:
    return {
        "name": name,
        "model_name": "gemma-3-270m",
        "inference_framework": "llamacpp",
        "checkpoint_path": GEMMA_FILE,
        "min_workers": 1,
        "max_workers": 1,
        "per_worker": 2,
        "labels": {},
        "metadata": {},
        **fields,
    }


def create(client: httpx.Client, body: dict[str, Any]) -> str:
    reply = client.post("/v1/llm/model-endpoints", json=body)
    assert reply.status_code == 200, reply.text
    return str(reply.json()["endpoint_creation_task_id"])


def chat(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
    )


def events(client: httpx.Client, endpoint_id: str) -> list[str]:
    reply = client.get(f"/v1/model-endpoints/{endpoint_id}/events")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    listed = body["events"] if isinstance(body, dict) else body
    return [str(e["message"]) for e in listed]


def pulling(client: httpx.Client, endpoint_id: str) -> dict[str, Any] | None:
    """The endpoint's GET while its pull has moved some bytes, else None."""
    now = describe(client, endpoint_id)
    progress = now.get("progress")
    return now if progress and progress["done_bytes"] > 0 else None


class Heartbeats:
    """Samples the builder's heartbeat in Redis: the time of each tick it completed."""

    def __init__(self, appliance: Appliance) -> None:
        self.client = redis.Redis.from_url(appliance.redis.url)
        self.beats: list[float] = []

    def sample(self) -> None:
        raw = self.client.get(bus.HEARTBEAT_KEY.format(role="builder"))
        if raw is not None and (not self.beats or float(raw) != self.beats[-1]):
            self.beats.append(float(raw))

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.beats, self.beats[1:], strict=False)]


def sampled_wait(beats: Heartbeats, check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    def checked() -> Any:
        beats.sample()
        return check()

    return wait_until(checked, timeout_s, what, every_s=0.25)


def test_a_slow_pull_never_holds_up_other_endpoints(
    slow_image: str, proxy: ThrottleProxy, make_appliance: Callable[..., Appliance]
) -> None:  # slow_image first: set up before the appliance, removed after its containers
    appliance = make_appliance(APPLIANCE_APPROVED_IMAGES=json.dumps([slow_image]))
    client = appliance.client()
    a = create(client, gemma("pulled", image=slow_image))
    during = wait_until(lambda: pulling(client, a), 120, "A's pull to move bytes")
    assert during["status"] == "UPDATE_IN_PROGRESS"
    assert during["status_reason"].startswith(f"pulling image {slow_image}: ")
    progress = during["progress"]
    assert progress["kind"] == "image" and progress["ref"] == slow_image
    assert progress["total_parts"] >= 2 and progress["done_parts"] < progress["total_parts"]
    assert appliance.containers() == []  # no container before its image is there

    beats = Heartbeats(appliance)
    b = create(client, gemma("beside"))
    sampled_wait(beats, lambda: describe(client, b)["status"] == "READY", READY_WITHIN_S, "B")
    assert chat(client, "beside").status_code == 200
    edit = client.put("/v1/llm/model-endpoints/beside", json={"max_model_len": 1024})
    assert edit.status_code == 200, edit.text
    sampled_wait(
        beats,
        lambda: (now := describe(client, b))["generation"] == 2 and now["status"] == "READY",
        READY_WITHIN_S,
        "B's edit to roll",
    )
    assert chat(client, "beside").status_code == 200
    # B can be done within a few ticks on a quiet machine: sample on, while A still pulls
    sampled_wait(beats, lambda: len(beats.gaps()) >= 10, 60, "ten builder ticks in all")
    still = describe(client, a)
    assert still["status"] == "UPDATE_IN_PROGRESS" and still["progress"] is not None
    gaps = beats.gaps()
    print(
        f"builder ticks during the pull: {len(gaps)} gaps, median {statistics.median(gaps):.2f}"
        f" s, max {max(gaps):.2f} s (interval {TICK_S} s)"
    )
    # a pull that held the loop would leave one gap as long as the pull (the whole test); a
    # tick that rolls B's replica waits on the Docker Engine, seconds on a loaded machine
    assert len(gaps) >= 10 and max(gaps) < 10 * TICK_S

    milestone = f"pulling image {slow_image}: "  # an event with the figures, now and then
    wait_until(lambda: any(m.startswith(milestone) for m in events(client, a)), 60, milestone)

    # the builder killed mid-pull pulls again when it comes back
    appliance.stop_role("builder", signal.SIGKILL)
    appliance.start_role("builder")
    proxy.set_rate(FAST_BPS)
    wait_status(client, a, "READY", READY_WITHIN_S)
    assert chat(client, "pulled").status_code == 200
    told = events(client, a)
    assert any(m.startswith(f"pulled image {slow_image}: ") for m in told), told
    assert describe(client, a)["progress"] is None
    assert proxy.sent_bytes >= PAD_BYTES


def test_an_unknown_tag_fails_with_the_registrys_words(
    make_appliance: Callable[..., Appliance], proxy: ThrottleProxy, docker_ready: None
) -> None:
    missing = f"{proxy.address}/appliance-pulltest/llama.cpp:no-such-tag"
    appliance = make_appliance(APPLIANCE_APPROVED_IMAGES=json.dumps([missing]))
    client = appliance.client()
    endpoint_id = create(client, gemma("missing", image=missing))
    failed = wait_status(client, endpoint_id, "UPDATE_FAILED", 60)
    assert failed["status_reason"].startswith(f"cannot pull image {missing}: ")
    assert "manifest unknown" in failed["status_reason"]
    assert failed["progress"] is None
    assert appliance.containers() == []
    assert any("manifest unknown" in m for m in events(client, endpoint_id))


def test_a_registry_gone_mid_pull_fails_then_a_restart_succeeds(
    slow_image: str,
    registry: Registry,
    proxy: ThrottleProxy,
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(APPLIANCE_APPROVED_IMAGES=json.dumps([slow_image]))
    client = appliance.client()
    endpoint_id = create(client, gemma("unplugged", image=slow_image))
    wait_until(lambda: pulling(client, endpoint_id), 120, "the pull to move bytes")
    registry.stop()
    proxy.cut()
    try:
        failed = wait_status(client, endpoint_id, "UPDATE_FAILED", 240)  # Docker retries first
    finally:
        registry.start()
    print("registry gone mid-pull:", failed["status_reason"])
    assert failed["status_reason"].startswith(f"cannot pull image {slow_image}: ")
    assert "(the registry " in failed["status_reason"]  # EOF or refused, said in words
    assert appliance.containers() == []

    proxy.set_rate(FAST_BPS)
    reply = client.post(f"/v1/model-endpoints/{endpoint_id}/restart")
    assert reply.status_code == 200, reply.text
    wait_status(client, endpoint_id, "READY", READY_WITHIN_S, generation=2)
    assert chat(client, "unplugged").status_code == 200
    assert len(appliance.containers()) == 1
