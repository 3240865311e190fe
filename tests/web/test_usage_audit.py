"""Usage and audit on a real Gemma 3 270M llama.cpp endpoint (one start for the module): two
teams' keys send known traffic -- sync, streaming, async tasks and an OpenAI batch -- and
`GET /v1/usage` and its CSV give exactly the requests, tokens and errors the clients saw, per
team, key and endpoint; a team sees only its rows; the hours stay after a Redis wipe; the
Usage and Audit pages show the same numbers and entries, checked at 1280 px and 390 px; and
the Audit page lists every action of `tests/api/test_audit.py` as an admin sees it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.api.test_audit import EVERY_ACTION, every_action
from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.forwarder.test_async_support import wait_tasks
from tests.harness import ADMIN_KEY, Appliance, wait_until
from tests.web.browser import check_page, sign_in

# (team, key id) -> [requests, prompt tokens, completion tokens, errors]
Counts = dict[tuple[str, str], list[int]]
SENT = {"red": (2, 2, 2, 2), "blue": (1, 1, 1, 1)}  # sync, streamed, async tasks, batch lines
CHAT = [{"role": "user", "content": "Name a colour."}]
SINCE = str(int(time.time()) - 2 * 86400)  # every hour the traffic can touch


@dataclass
class Traffic:
    appliance: Appliance
    keys: dict[str, tuple[str, str]]  # team -> (key text, key id)
    expected: Counts = field(default_factory=dict)

    def add(self, team: str, usage: dict[str, Any] | None, error: bool = False) -> None:
        row = self.expected.setdefault((team, self.keys[team][1]), [0, 0, 0, 0])
        row[0] += 1
        if usage:
            row[1] += usage["prompt_tokens"]
            row[2] += usage["completion_tokens"]
        row[3] += int(error)


def sync_chat(client: httpx.Client) -> dict[str, Any]:
    reply = client.post(
        "/v1/chat/completions",
        json={"model": "gemma", "messages": CHAT, "max_tokens": 6, "temperature": 0},
    )
    assert reply.status_code == 200, reply.text
    usage: dict[str, Any] = reply.json()["usage"]
    return usage


def streamed_chat(client: httpx.Client, *, ask: bool = True) -> dict[str, Any] | None:
    """A stream's usage, asked for (`ask`); one that does not ask gets no usage chunk."""
    body: dict[str, Any] = {
        "model": "gemma",
        "messages": CHAT,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
    }
    if ask:
        body["stream_options"] = {"include_usage": True}
    usage, events = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            data = line.removeprefix("data: ").strip()
            if line.startswith("data: ") and data != "[DONE]":
                events += 1
                assert json.loads(data)["choices"] or ask, data  # no usage-only chunk
                usage = json.loads(data).get("usage") or usage
    assert events > 1 and (usage is not None) == ask, (events, usage)
    return usage


def async_tasks(client: httpx.Client, endpoint_id: str, n: int) -> list[dict[str, Any]]:
    ids = []
    for _ in range(n):
        args = {"messages": CHAT, "max_tokens": 5, "temperature": 0}
        reply = client.post(f"/v1/async-tasks?model_endpoint_id={endpoint_id}", json={"args": args})
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["task_id"])
    done = wait_tasks(client, ids, 180)
    assert all(t["status"] == "SUCCESS" for t in done.values()), done
    return [json.loads(t["result"]["result"])["usage"] for t in done.values()]


def batch(client: httpx.Client, n: int) -> list[dict[str, Any]]:
    lines = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "gemma", "messages": CHAT, "max_tokens": 4},
            }
        )
        + "\n"
        for i in range(n)
    )
    upload = client.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", lines.encode())}
    )
    made = client.post(
        "/v1/batches",
        json={"input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    assert made.status_code == 200, made.text
    batch_id = made.json()["id"]
    final = wait_until(
        lambda: (b := client.get(f"/v1/batches/{batch_id}").json())["status"] == "completed" and b,
        180,
        "the batch to complete",
    )
    text = client.get(f"/v1/files/{final['output_file_id']}/content").text
    return [json.loads(line)["response"]["body"]["usage"] for line in text.splitlines()]


@pytest.fixture(scope="module")
def traffic(make_module_appliance: Callable[..., Appliance]) -> Iterator[Traffic]:
    appliance = make_module_appliance(APPLIANCE_SWEEP_INTERVAL_S="1")
    appliance.start_role("worker")
    admin = appliance.client()
    create_gemma(admin, "gemma", public_inference=True, per_worker=4)
    keys = {}
    for team in ("red", "blue"):
        made = admin.post("/v1/api-keys", json={"name": f"{team}-ci", "team": team, "user": team})
        keys[team] = (made.json()["key"], made.json()["id"])
    wait_ready(admin, "gemma")
    endpoint_id = admin.get("/v1/llm/model-endpoints/gemma").json()["id"]
    found = Traffic(appliance, keys)
    for team, (sync_n, stream_n, task_n, batch_n) in SENT.items():
        client = appliance.client(keys[team][0])
        for _ in range(sync_n):
            found.add(team, sync_chat(client))
        usage = None
        for _ in range(stream_n):
            usage = streamed_chat(client)
            found.add(team, usage)
        # a stream that does not ask for its usage is counted all the same (as the same
        # stream that asks), and gets no usage chunk
        assert streamed_chat(client, ask=False) is None
        found.add(team, usage)
        for usage in async_tasks(client, endpoint_id, task_n):
            found.add(team, usage)
        for usage in batch(client, batch_n):
            found.add(team, usage)
    refused = appliance.client(keys["blue"][0]).post(
        "/v1/chat/completions", json={"model": "gemma", "messages": "not a list"}
    )
    assert refused.status_code >= 400  # the replica refuses it: an error, counted as one
    found.add("blue", None, error=True)
    yield found


def usage_rows(client: httpx.Client, **params: str) -> list[dict[str, Any]]:
    reply = client.get("/v1/usage", params={"from": SINCE, **params})
    assert reply.status_code == 200, reply.text
    rows: list[dict[str, Any]] = reply.json()["data"]
    return rows


def summed(rows: list[dict[str, Any]]) -> Counts:
    """Requests of endpoint gemma per (team, key), over every hour the traffic touched."""
    out: Counts = {}
    for row in rows:
        if row["endpoint"] != "gemma" or not row["key_id"]:
            continue
        mine = out.setdefault((row["team"], row["key_id"]), [0, 0, 0, 0])
        for i, name in enumerate(("requests", "prompt_tokens", "completion_tokens", "errors")):
            mine[i] += int(row[name])
    return out


def test_usage_and_its_csv_give_the_exact_counts(traffic: Traffic) -> None:
    admin = traffic.appliance.client()
    wait_until(
        lambda: summed(usage_rows(admin)) == traffic.expected,
        30,
        f"usage to reach {traffic.expected}",
        every_s=1,
    )
    reply = admin.get("/v1/usage", params={"from": SINCE, "format": "csv"})
    assert reply.headers["content-type"].startswith("text/csv")
    assert summed(list(csv.DictReader(io.StringIO(reply.text)))) == traffic.expected
    daily = usage_rows(admin, granularity="day")
    assert summed(daily) == traffic.expected
    by_key = usage_rows(admin, key=traffic.keys["red"][1])
    assert {r["key_name"] for r in by_key} == {"red-ci"}
    # replica time: the Gemma replica's running time, on the endpoint owner's rows (no GPU)
    wait_until(
        lambda: any(r["replica_seconds"] > 0 for r in usage_rows(admin, team="admin")),
        90,
        "the replica's running time in the usage table",
        every_s=2,
    )


def test_a_team_sees_only_its_own_usage(traffic: Traffic) -> None:
    red = traffic.appliance.client(traffic.keys["red"][0])
    rows = usage_rows(red)
    assert rows and {r["team"] for r in rows} == {"red"}
    red_id = traffic.keys["red"][1]
    assert summed(rows) == {("red", red_id): traffic.expected[("red", red_id)]}
    refused = red.get("/v1/usage", params={"team": "blue"})
    assert refused.status_code == 403
    csv_text = red.get("/v1/usage", params={"from": SINCE, "format": "csv"}).text
    assert "blue" not in csv_text and "red-ci" in csv_text


def test_past_hours_survive_a_redis_wipe(traffic: Traffic) -> None:
    port = str(traffic.appliance.redis.port)
    subprocess.run(["redis-cli", "-p", port, "FLUSHALL"], check=True, capture_output=True)
    admin = traffic.appliance.client()
    assert summed(usage_rows(admin)) == traffic.expected


def test_usage_and_audit_pages_show_them(traffic: Traffic, page: Any) -> None:
    base = traffic.appliance.url
    sign_in(page, base, ADMIN_KEY)
    page.click("nav >> text=Usage")
    for team in ("red", "blue"):
        requests, prompt, completion, errors = traffic.expected[(team, traffic.keys[team][1])]
        row = page.locator(f'#usage-teams tr[data-team="{team}"]')
        assert row.locator('[data-col="requests"]').inner_text() == str(requests)
        assert row.locator('[data-col="prompt_tokens"]').inner_text() == str(prompt)
        assert row.locator('[data-col="completion_tokens"]').inner_text() == str(completion)
        assert row.locator('[data-col="errors"]').inner_text() == str(errors)
        keyed = page.locator(f'#usage-rows tr[data-key="{traffic.keys[team][1]}"]')
        assert keyed.locator('[data-col="requests"]').inner_text() == str(requests)
    captions = page.locator(".chart figcaption").all_inner_texts()
    assert any(c.startswith("red") for c in captions) and any("gemma" in c for c in captions)
    assert all("peak" not in c or c.endswith("tok/h") for c in captions), captions
    check_page(page, "usage")
    page.goto(base + "/ui/usage?granularity=day")
    check_page(page, "usage-daily")

    page.click("nav >> text=Audit")
    rows = "#audit tr[data-action]"
    actions = page.eval_on_selector_all(rows, "r => r.map(x => x.dataset.action)")
    for action in ("key.create", "endpoint.create", "file.upload", "batch.create"):
        assert action in actions, actions
    assert "session.sign_in" in actions
    text = page.inner_text("#audit")
    assert "red-ci" in text and "gemma" in text
    for key_text, _ in traffic.keys.values():
        assert key_text not in page.content()
    check_page(page, "audit")

    # The endpoints table keeps Status in view on a phone; the latency chart names its unit.
    page.goto(base + "/ui/endpoints")
    page.set_viewport_size({"width": 390, "height": 900})
    status = page.locator('tr[data-endpoint="gemma"] [data-col="status"]').bounding_box()
    assert status and status["x"] + status["width"] <= 390, status
    page.set_viewport_size({"width": 1280, "height": 900})
    endpoint_id = traffic.appliance.client().get("/v1/llm/model-endpoints/gemma").json()["id"]
    page.goto(f"{base}/ui/endpoints/{endpoint_id}")
    latency = page.locator(".chart figcaption", has_text="Latency").inner_text()
    assert "peak" not in latency or latency.rstrip().endswith(" s"), latency

    # A team's key sees its own usage only, and no audit page.
    page.click("text=Sign out")
    sign_in(page, base, traffic.keys["red"][0])
    page.goto(base + "/ui/usage")
    assert page.locator("#usage-teams tr[data-team]").all_inner_texts()[0].startswith("red")
    assert page.locator('#usage-teams tr[data-team="blue"]').count() == 0
    assert page.locator("nav >> text=Audit").count() == 0
    assert page.goto(base + "/ui/audit").status == 403  # type: ignore[union-attr]


def test_audit_page_shows_every_action(api_only: Appliance, page: Any) -> None:
    """The entries of `tests/api/test_audit.py`'s actions, as an admin sees them."""
    done = every_action(api_only)
    sign_in(page, api_only.url, ADMIN_KEY)
    page.click("nav >> text=Audit")
    rows = page.locator("#audit tr[data-action]")
    shown = [
        (row.get_attribute("data-action"), row.locator("td").nth(1).inner_text().split(" · ")[0])
        for row in rows.all()
    ]
    assert shown[0] == ("session.sign_in", "admin")  # this very sign-in, newest first
    assert list(reversed(shown[1:])) == [(a, who or "—") for a, who in EVERY_ACTION]
    update = page.locator('#audit tr[data-action="endpoint.update"]').inner_text()
    assert "max_replicas" in update and done.endpoint_id in update and "audited" in update
    for key in (ADMIN_KEY, done.red_key, done.refused_key):
        assert key not in page.content()
    check_page(page, "audit-every-action")
    page.select_option("#a-action", "key.")
    page.click(".filters button")
    assert set(rows.evaluate_all("r => r.map(x => x.dataset.action)")) == {
        "key.create",
        "key.revoke",
    }
