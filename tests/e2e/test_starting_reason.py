"""While an endpoint's first replica starts, its `status_reason` says for how long and what the
replica last printed, as a user reads it (both REST GETs and the UI's endpoint page); READY
clears it, and the changing seconds and lines write no events."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import httpx

from tests.e2e.lifecycle import create, describe
from tests.harness import ADMIN_KEY, VLLM_IMAGE, Appliance

NAME = "slow-start"
STARTUP_DELAY_S = 15  # the stand-in prints its first line, then "loads weights" this long
PRINTED = "INFO vLLM stand-in: model=acme/slow-1b"
STARTING = re.compile(r"^starting 1 replica \((\d+) s\)(: (.*))?$")


def slow_custom_endpoint() -> dict[str, object]:
    """A custom-image endpoint on the stand-in: prints a line at once, healthy only later."""
    command = ["acme/slow-1b", "--host", "0.0.0.0", "--port", "8000"]
    return {
        "name": NAME,
        "model_name": "acme/slow-1b",
        "inference_framework": "custom",
        "image": VLLM_IMAGE,
        "command": [*command, "--served-model-name", NAME],
        "port": 8000,
        "healthcheck_route": "/health",
        "env": {"VLLM_STANDIN_STARTUP_DELAY_S": str(STARTUP_DELAY_S)},
        "min_workers": 1,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
    }


def signed_in(appliance: Appliance) -> httpx.Client:
    """A cookie-keeping client signed in through the UI's form, as a browser is."""
    client = httpx.Client(base_url=appliance.url, timeout=30)
    form = client.get("/ui/sign-in").text
    token = re.search(r'name="csrf" (?:value|content)="([^"]+)"', form)
    assert token, "no CSRF token on the sign-in page"
    reply = client.post("/ui/sign-in", data={"csrf": token.group(1), "key": ADMIN_KEY})
    assert reply.status_code == 303, reply.text
    return client


def test_a_starting_replica_s_last_line_is_the_reason_until_it_is_ready(
    make_appliance: Callable[..., Appliance],
) -> None:
    appliance = make_appliance(APPLIANCE_APPROVED_IMAGES=json.dumps([VLLM_IMAGE]))
    client = appliance.client()
    endpoint_id = create(client, slow_custom_endpoint())

    ui = signed_in(appliance)
    seen: dict[str, str] = {}  # each reason read -> the status it came with
    page = ""
    deadline = time.monotonic() + 60 + STARTUP_DELAY_S
    while (state := describe(client, endpoint_id))["status"] != "READY":
        assert time.monotonic() < deadline, f"not READY: {state['status']} {seen}"
        assert state["status"] != "UPDATE_FAILED", state["status_reason"]
        reason = state["status_reason"]
        if reason:
            seen[reason] = state["status"]
        if reason and PRINTED in reason and not page:  # the same, by name and in the UI
            by_name = client.get(f"/v1/llm/model-endpoints/{NAME}").json()
            assert PRINTED in str(by_name["status_reason"]), by_name
            page = ui.get(f"/ui/endpoints/{endpoint_id}/live").text
        time.sleep(0.3)
    assert [r for r in seen if PRINTED in r], f"the printed line was never the reason: {seen}"
    assert PRINTED in page, page
    assert all(STARTING.match(r) and s == "UPDATE_IN_PROGRESS" for r, s in seen.items()), seen
    seconds = {int(found[1]) for r in seen if (found := STARTING.match(r))}
    assert len(seconds) >= 2, f"the elapsed time never moved: {seen}"
    assert state["status_reason"] is None
    assert client.get(f"/v1/llm/model-endpoints/{NAME}").json()["status_reason"] is None

    events = client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    messages = [e["message"] for e in events]
    assert not [m for m in messages if "starting 1 replica" in m], messages
    assert any(m.startswith("READY") for m in messages), messages
