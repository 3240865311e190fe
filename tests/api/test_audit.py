"""The audit log: each management action (endpoints, keys, sign-in and sign-out, files,
batches) leaves one entry with its actor, target, address and change; an edit that changes
nothing leaves none; no key's text is ever stored; only admins read it."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import httpx

from tests.e2e.lifecycle import standin_body
from tests.harness import ADMIN_KEY, Appliance, within_one_minute


def entries(admin: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    reply = admin.get("/v1/audit", params=params)
    assert reply.status_code == 200, reply.text
    found: list[dict[str, Any]] = reply.json()["entries"]
    return found


def mark_ready(appliance: Appliance, name: str) -> None:
    """The builder's part (none runs here): the endpoint's rollout finished."""
    with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
        db.execute("UPDATE endpoint SET status = 'READY' WHERE name = ?", (name,))


def ui_client(appliance: Appliance, key: str) -> tuple[httpx.Client, httpx.Response]:
    client = httpx.Client(base_url=appliance.url, timeout=30)
    form = client.get("/ui/sign-in").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form)
    assert csrf
    reply = client.post("/ui/sign-in", data={"csrf": csrf.group(1), "key": key})
    return client, reply


def upload(client: httpx.Client, model: str) -> str:
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "x"}]},
    }
    made = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
    )
    assert made.status_code == 200, made.text
    return str(made.json()["id"])


@dataclass(frozen=True)
class Done:
    """What `every_action` did: the keys it used and the objects it touched."""

    red_key: str
    red_key_id: str
    endpoint_id: str
    spare_file: str
    refused_key: str


EVERY_ACTION = [
    ("key.create", "admin"),
    ("endpoint.create", "rosa"),
    ("endpoint.update", "rosa"),
    ("endpoint.restart", "rosa"),
    ("file.upload", "rosa"),
    ("batch.create", "rosa"),
    ("batch.cancel", "rosa"),
    ("file.upload", "rosa"),
    ("file.delete", "rosa"),
    ("endpoint.delete", "rosa"),
    ("session.sign_in", "rosa"),
    ("session.sign_out", "rosa"),
    ("session.sign_in_refused", ""),
    ("key.revoke", "admin"),
]


def every_action(appliance: Appliance) -> Done:
    """Each management action once, in EVERY_ACTION's order (the UI test reuses it)."""
    admin = appliance.client()
    made = admin.post("/v1/api-keys", json={"name": "red", "team": "red", "user": "rosa"})
    assert made.status_code == 201
    red_key, red_key_id = made.json()["key"], made.json()["id"]
    red = appliance.client(red_key)

    # Endpoints: create, edit (one entry naming the change), an edit changing nothing (none),
    # restart, delete; each by the red team's key.
    reply = red.post("/v1/model-endpoints", json=standin_body("audited", gpus=0))
    endpoint_id = reply.json()["endpoint_creation_task_id"]
    mark_ready(appliance, "audited")
    assert red.put("/v1/llm/model-endpoints/audited", json={"max_workers": 2}).status_code == 200
    assert red.put("/v1/llm/model-endpoints/audited", json={"max_workers": 2}).status_code == 200
    mark_ready(appliance, "audited")
    assert red.post(f"/v1/model-endpoints/{endpoint_id}/restart").status_code == 200
    events = red.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    updated = [e["message"] for e in events if e["kind"] == "updated"]
    assert updated == ["updated by rosa: max replicas 1 → 2"], updated
    mark_ready(appliance, "audited")

    # Files and batches.
    file_id = upload(red, "audited")
    batch = red.post(
        "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    )
    assert batch.status_code == 200, batch.text
    assert red.post(f"/v1/batches/{batch.json()['id']}/cancel").status_code == 200
    spare = upload(red, "audited")
    assert red.delete(f"/v1/files/{spare}").status_code == 200
    assert red.delete(f"/v1/model-endpoints/{endpoint_id}").status_code == 200

    # Sign-in, a refused sign-in, sign-out; then the key's revocation.
    browser, signed = ui_client(appliance, red_key)
    assert signed.status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/ui/keys").text)
    assert csrf and browser.post("/ui/sign-out", data={"csrf": csrf.group(1)}).status_code == 303
    bogus = "mea_0123456789ab_notarealkeynotarealkey00"
    assert ui_client(appliance, bogus)[1].status_code == 401
    assert admin.delete(f"/v1/api-keys/{red_key_id}").status_code == 200
    return Done(red_key, red_key_id, endpoint_id, spare, bogus)


def test_each_action_leaves_one_entry_and_no_key_text(api_only: Appliance) -> None:
    done = every_action(api_only)
    admin = api_only.client()
    red_key_id = done.red_key_id
    log = list(reversed(entries(admin, limit=100)))
    assert [(e["action"], e["actor"]) for e in log] == EVERY_ACTION
    created = log[0]
    assert (created["team"], created["target"]) == ("admin", red_key_id)
    assert created["change"]["team"] == "red"
    by_action = {e["action"]: e for e in log}
    update = by_action["endpoint.update"]
    assert update["target"] == done.endpoint_id and update["team"] == "red"
    assert update["change"]["changes"] == {"max_replicas": [1, 2]}
    assert by_action["endpoint.create"]["change"]["spec"]["name"] == "audited"
    assert by_action["batch.create"]["change"]["requests"] == 1
    assert by_action["file.delete"]["target"] == done.spare_file
    assert by_action["session.sign_in"]["target"] == red_key_id
    assert by_action["key.revoke"]["change"] == {"name": "red", "team": "red", "user": "rosa"}
    assert all(e["address"] == "127.0.0.1" for e in log)

    # No key text anywhere in the log: not the keys used, not the refused one, not a prefix.
    with sqlite3.connect(api_only.data_dir / "appliance.db") as db:
        stored = json.dumps(db.execute("SELECT * FROM audit").fetchall())
    for text in (ADMIN_KEY, done.red_key, done.refused_key):
        prefix = "_".join(text.split("_")[:2])
        assert text not in stored and prefix not in stored
        assert prefix not in json.dumps(log)


def test_the_log_is_for_admins_and_append_only(api_only: Appliance) -> None:
    admin = api_only.client()
    made = admin.post("/v1/api-keys", json={"name": "blue", "team": "blue", "user": "bo"})
    blue = api_only.client(made.json()["key"])
    refused = blue.get("/v1/audit")
    assert refused.status_code == 403 and "administrator" in refused.json()["detail"]
    bad = admin.get("/v1/audit", params={"from": "yesterday"})
    assert bad.status_code == 422 and "from" in bad.json()["detail"]
    for params in ({"from": "nan"}, {"to": "1e30"}, {"from": "-5"}):  # bounded, never a 500
        assert admin.get("/v1/usage", params=params).status_code == 422, params
    assert admin.get("/v1/audit", params={"before": str(10**30)}).status_code == 422
    for granularity in ("hour", "day"):  # the last instant accepted, rounded up to its period
        last = {"to": "9999-12-31T23:59:59Z", "granularity": granularity}
        assert admin.get("/v1/usage", params=last).status_code == 200, granularity
    forever = {"name": "x", "expires_in_seconds": 10**12}
    assert admin.post("/v1/api-keys", json=forever).status_code == 422
    with sqlite3.connect(api_only.data_dir / "appliance.db") as db:
        try:
            db.execute("UPDATE audit SET actor = 'someone else'")
        except sqlite3.IntegrityError as exc:
            assert "append-only" in str(exc)
        else:
            raise AssertionError("an audit entry was changed")
    (entry,) = entries(admin, action="key.")
    assert entry["actor"] == "admin"


def test_refused_sign_ins_cannot_flood_the_log(api_only: Appliance) -> None:
    """Anyone may post keys to the sign-in form, and each refusal was a row kept for a year
    (480 a second from one client). Now an address gets 10 audited refusals a minute, then 429
    with Retry-After, its keys untried, and the log says once how many more there were."""
    within_one_minute(room_s=30)

    def sign_in(key: str, address: str = "127.0.0.1") -> httpx.Response:
        browser = httpx.Client(base_url=api_only.url, timeout=30)
        csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/ui/sign-in").text)
        assert csrf
        sent = {"csrf": csrf.group(1), "key": key}
        return browser.post("/ui/sign-in", data=sent, headers={"x-forwarded-for": address})

    bogus = "mea_0123456789ab_notarealkeynotarealkey00"
    statuses = [sign_in(bogus).status_code for _ in range(30)]
    assert statuses == [401] * 10 + [429] * 20
    throttled = sign_in(ADMIN_KEY)  # a right key too: it is not tried
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) <= 60
    assert "Too many refused sign-ins" in throttled.text
    assert sign_in(ADMIN_KEY, address="10.0.0.7").status_code == 303  # another address

    admin = api_only.client()
    refused = entries(admin, action="session.sign_in_refused", limit=100)
    assert len(refused) == 10 and {e["address"] for e in refused} == {"127.0.0.1"}
    assert "further tries" in refused[0]["change"]["throttled"]

    time.sleep(60.2 - time.time() % 60)  # the next minute: the address may try again
    assert sign_in(ADMIN_KEY).status_code == 303
    summary = entries(admin, action="session.sign_in_refused", limit=100)[0]
    assert summary["change"]["count"] == 21 and summary["address"] == "127.0.0.1"
    assert "21 more refused sign-ins from 127.0.0.1" in summary["change"]["reason"]


def test_a_key_without_manage_reads_its_own_usage_only(api_only: Appliance) -> None:
    """A key made for inference alone learns what it used itself (its rows, JSON or CSV), and
    nothing of its team's other keys; a team's manage key still reads them all."""
    admin = api_only.client()
    made = {
        name: admin.post("/v1/api-keys", json={"name": name, "team": "blue", "user": "bo"} | body)
        for name, body in (("caller", {"scopes": ["inference"]}), ("manager", {}))
    }
    ids = {name: reply.json()["id"] for name, reply in made.items()}
    hour = int(time.time()) // 3600 * 3600
    with sqlite3.connect(api_only.data_dir / "appliance.db") as db:
        for name, requests in (("caller", 3), ("manager", 5)):
            db.execute(
                "INSERT INTO usage (hour, team, key_id, endpoint, model, requests, "
                "prompt_tokens, completion_tokens) VALUES (?, 'blue', ?, 'e', 'm', ?, 1, 2)",
                (hour, ids[name], requests),
            )
    caller = api_only.client(made["caller"].json()["key"])
    own = caller.get("/v1/usage")
    assert own.status_code == 200, own.text
    assert [(r["key_id"], r["requests"]) for r in own.json()["data"]] == [(ids["caller"], 3)]
    assert own.json()["totals"]["requests"] == 3
    csv_text = caller.get("/v1/usage", params={"format": "csv"}).text
    assert ids["caller"] in csv_text and ids["manager"] not in csv_text
    other = caller.get("/v1/usage", params={"key": ids["manager"]})
    assert other.status_code == 403 and "own usage only" in other.json()["detail"], other.text
    manager = api_only.client(made["manager"].json()["key"])
    rows = manager.get("/v1/usage").json()["data"]
    assert sorted(r["requests"] for r in rows) == [3, 5]
