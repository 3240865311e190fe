"""Tenancy: every route that takes an id or a name answers 404 for another team's object, and
lists show a team only its own (plus public endpoints where inference is concerned)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.e2e.lifecycle import standin_body
from tests.harness import Appliance


def team_key(admin: httpx.Client, team: str) -> str:
    made = admin.post("/v1/api-keys", json={"name": team, "team": team, "user": f"{team}-1"})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def make_objects(red: httpx.Client) -> dict[str, Any]:
    private = red.post(
        "/v1/model-endpoints",
        json=standin_body("red-private", public_inference=False, endpoint_type="async", gpus=0),
    )
    assert private.status_code == 200, private.text
    public = red.post(
        "/v1/llm/model-endpoints", json=standin_body("red-public", public_inference=True, gpus=0)
    )
    assert public.status_code == 200, public.text
    eid = private.json()["endpoint_creation_task_id"]
    task = red.post(
        "/v1/async-tasks",
        params={"model_endpoint_id": eid},
        json={"args": {"prompt": "hi", "max_tokens": 1}},
    )
    assert task.status_code == 200, task.text
    line = {
        "custom_id": "1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "red-private", "messages": [{"role": "user", "content": "x"}]},
    }
    upload = red.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n")},
    )
    assert upload.status_code == 200, upload.text
    batch = red.post(
        "/v1/batches",
        json={
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert batch.status_code == 200, batch.text
    key = red.post("/v1/api-keys", json={"name": "red-laptop"})
    assert key.status_code == 201, key.text
    return {
        "endpoint": eid,
        "task": task.json()["task_id"],
        "file": upload.json()["id"],
        "batch": batch.json()["id"],
        "key": key.json()["id"],
    }


def test_another_teams_objects_are_not_found_and_not_listed(api_only: Appliance) -> None:
    admin = api_only.client()
    red = api_only.client(team_key(admin, "red"))
    blue = api_only.client(team_key(admin, "blue"))
    ids = make_objects(red)

    e, t, f, b, k = ids["endpoint"], ids["task"], ids["file"], ids["batch"], ids["key"]
    for method, path, body in [
        ("GET", f"/v1/model-endpoints/{e}", None),
        ("PUT", f"/v1/model-endpoints/{e}", {"max_workers": 2}),
        ("DELETE", f"/v1/model-endpoints/{e}", None),
        ("POST", f"/v1/model-endpoints/{e}/restart", None),
        ("GET", f"/v1/model-endpoints/{e}/events", None),
        ("GET", f"/v1/model-endpoints/{e}/logs", None),
        ("GET", "/v1/llm/model-endpoints/red-private", None),
        ("PUT", "/v1/llm/model-endpoints/red-private", {"max_workers": 2}),
        ("DELETE", "/v1/llm/model-endpoints/red-private", None),
        ("GET", "/v1/llm/model-endpoints/red-public", None),  # public: inference only
        ("PUT", "/v1/llm/model-endpoints/red-public", {"max_workers": 2}),
        ("DELETE", "/v1/llm/model-endpoints/red-public", None),
        ("GET", f"/v1/async-tasks/{t}", None),
        ("POST", f"/v1/async-tasks?model_endpoint_id={e}", {"args": {"prompt": "x"}}),
        ("GET", f"/v1/files/{f}", None),
        ("GET", f"/v1/files/{f}/content", None),
        ("DELETE", f"/v1/files/{f}", None),
        ("GET", f"/v1/batches/{b}", None),
        ("POST", f"/v1/batches/{b}/cancel", None),
        ("GET", f"/v1/api-keys/{k}", None),
        ("DELETE", f"/v1/api-keys/{k}", None),
        ("POST", "/v1/chat/completions", {"model": "red-private", "messages": []}),
        ("POST", f"/v1/sync-tasks?model_endpoint_id={e}", {"args": {"prompt": "x"}}),
    ]:
        reply = blue.request(method, path, json=body)
        assert reply.status_code == 404, f"{method} {path}: {reply.status_code} {reply.text}"
        assert "red" not in reply.text.replace("red-private", "").replace("red-public", "")

    assert blue.get("/v1/model-endpoints").json() == {"model_endpoints": []}
    assert blue.get("/v1/llm/model-endpoints").json() == {"model_endpoints": []}
    assert blue.get("/v1/llm/model-endpoints?name=red-public").json() == {"model_endpoints": []}
    # a public endpoint is listed for inference only, as an OpenAI model
    assert [m["id"] for m in blue.get("/v1/models").json()["data"]] == ["red-public"]
    assert blue.get("/v1/files").json()["data"] == []
    assert blue.get("/v1/batches").json()["data"] == []
    assert [k["team"] for k in blue.get("/v1/api-keys").json()["api_keys"]] == ["blue"]

    # the owner still sees everything, and the admin sees every team's
    assert red.get(f"/v1/model-endpoints/{e}").status_code == 200
    assert red.get(f"/v1/async-tasks/{t}").status_code == 200
    names = {m["name"] for m in admin.get("/v1/model-endpoints").json()["model_endpoints"]}
    assert names == {"red-private", "red-public"}


def test_an_endpoint_is_private_unless_made_public(api_only: Appliance) -> None:
    admin = api_only.client()
    red = api_only.client(team_key(admin, "red"))
    blue = api_only.client(team_key(admin, "blue"))
    body = standin_body("red-default", gpus=0)
    body.pop("public_inference", None)
    made = red.post("/v1/llm/model-endpoints", json=body)
    assert made.status_code == 200, made.text
    shown = red.get("/v1/llm/model-endpoints/red-default").json()
    assert shown["spec"]["public_inference"] is False
    assert blue.get("/v1/models").json()["data"] == []
    chat = {"model": "red-default", "messages": [{"role": "user", "content": "x"}]}
    assert blue.post("/v1/chat/completions", json=chat).status_code == 404


def test_tasks_reach_only_the_routes_the_endpoint_serves(api_only: Appliance) -> None:
    red = api_only.client(team_key(api_only.client(), "red"))
    made = red.post(
        "/v1/model-endpoints", json=standin_body("red-async", endpoint_type="async", gpus=0)
    )
    assert made.status_code == 200, made.text
    eid = made.json()["endpoint_creation_task_id"]
    for route in ("/tokenize", "/props", "/slots", "/metrics", "/v1/chat/completions/../x"):
        reply = red.post(
            f"/v1/async-tasks?model_endpoint_id={eid}",
            json={"args": {"prompt": "hi"}, "route": route},
        )
        assert reply.status_code == 400 and "route" in reply.text, (route, reply.text)
    ok = red.post(
        f"/v1/async-tasks?model_endpoint_id={eid}",
        json={"args": {"prompt": "hi", "max_tokens": 1}, "route": "/v1/completions"},
    )
    assert ok.status_code == 200, ok.text
