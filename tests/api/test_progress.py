"""`progress` in an endpoint's GET: what the builder published in Redis (`appliance:progress`),
validated by the api, null when nothing (or nothing it can read) is there; LLM Engine's client
still parses the endpoint."""

from __future__ import annotations

import json
import re

import httpx
import redis

from appliance import bus
from builder.prepare import Progress
from tests.api.test_llmengine_compat import client, seed
from tests.harness import ADMIN_KEY, Appliance

PULLING = Progress("image", "127.0.0.1:5000/acme/x:1", 12_000_000, 48_000_000, 2, 3)


def test_the_gets_show_what_the_builder_published(api_only: Appliance) -> None:
    seed(api_only)
    published = {
        "end_llama": json.dumps(PULLING.to_json()),
        "end_vllm-stream": "{not json",
    }
    redis.Redis.from_url(api_only.redis.url).hset(bus.PROGRESS_KEY, mapping=published)
    admin = api_only.client()

    by_id = admin.get("/v1/model-endpoints/end_llama").json()
    assert by_id["progress"] == PULLING.to_json()
    assert by_id["progress"]["description"] == (
        "pulling image 127.0.0.1:5000/acme/x:1: 12.0 of 48.0 MB, 2 of 3 layers"
    )
    assert by_id["progress"]["fraction"] == 0.25
    by_name = admin.get("/v1/llm/model-endpoints/llama").json()
    assert by_name["progress"] == by_name["spec"]["progress"] == PULLING.to_json()
    assert admin.get("/v1/model-endpoints/end_vllm-stream").json()["progress"] is None
    assert admin.get("/v1/model-endpoints/end_vllm-async").json()["progress"] is None
    listed = admin.get("/v1/model-endpoints").json()["model_endpoints"]
    assert {e["name"]: e["progress"] is not None for e in listed}["llama"] is True

    assert client(api_only, "read")["get"] == ["llama", "READY", "vllm"]
    schema = admin.get("/openapi.json").json()["components"]["schemas"]
    assert "done_bytes" in schema["EndpointProgress"]["properties"]


def signed_in(appliance: Appliance) -> httpx.Client:
    """An httpx client holding a UI session, as a browser would after signing in."""
    browser = httpx.Client(base_url=appliance.url, timeout=30)
    form = browser.get("/ui/sign-in").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf is not None
    reply = browser.post("/ui/sign-in", data={"csrf": csrf.group(1), "key": ADMIN_KEY})
    assert reply.status_code in (302, 303), reply.text
    return browser


def test_the_endpoint_page_draws_a_progress_bar_while_it_waits(api_only: Appliance) -> None:
    seed(api_only)
    redis.Redis.from_url(api_only.redis.url).hset(
        bus.PROGRESS_KEY, "end_llama", json.dumps(PULLING.to_json())
    )
    browser = signed_in(api_only)
    live = browser.get("/ui/endpoints/end_llama/live")
    assert live.status_code == 200, live.text
    bar = re.search(r"<progress[^>]*>", live.text)
    assert bar is not None and 'max="1000" value="250"' in bar.group(0)
    assert PULLING.describe() in live.text
    other = browser.get("/ui/endpoints/end_vllm-async/live").text
    assert "<progress" not in other
