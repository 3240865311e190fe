"""API keys: nobody gets in without one, a key is shown once and stored as a digest, revoked
and expired keys stop working within a second, and scopes are enforced."""

from __future__ import annotations

import json
import sqlite3
import time
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.harness import ADMIN_KEY, Appliance, RedisServer, make_key, wait_until

OPEN_ROUTES = {
    "/healthz",
    "/healthcheck",
    "/readyz",
    "/docs",
    "/redoc",
    "/openapi.json",
}


def test_every_route_but_health_needs_a_key(api_only: Appliance) -> None:
    schema = httpx.get(api_only.url + "/openapi.json").json()
    checked = 0
    for path, operations in schema["paths"].items():
        if path in OPEN_ROUTES or path.startswith("/ui"):
            continue
        concrete = path.replace("{", "").replace("}", "")
        for method in operations:
            reply = httpx.request(method.upper(), api_only.url + concrete, json={})
            assert reply.status_code == 401, f"{method} {path}: {reply.status_code}"
            bad = httpx.request(
                method.upper(),
                api_only.url + concrete,
                json={},
                headers={"Authorization": "Bearer mea_000000000000_nope"},
            )
            assert bad.status_code == 401, f"{method} {path} with a bad key: {bad.status_code}"
            checked += 1
    assert checked >= 10


def test_every_get_route_answers_head_as_it_answers_get(api_only: Appliance) -> None:
    """Uptime monitors and load balancers often check with HEAD (UptimeRobot's default), and
    HTTP asks it of every server: the health routes answered it 405, so the appliance read as
    down, and every other GET route still did. A HEAD is the GET's status and headers, no body,
    behind the same key."""
    key = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for path, headers in [
        ("/healthz", {}),
        ("/healthcheck", {}),
        ("/readyz", {}),
        ("/v1/models", key),
        ("/v1/llm/model-endpoints", key),
        ("/v1/models", {}),  # no key: the same 401
        ("/ui/sign-in", {}),
        ("/openapi.json", {}),
    ]:
        got = httpx.get(api_only.url + path, headers=headers)
        head = httpx.head(api_only.url + path, headers=headers)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers.get("content-type") == got.headers.get("content-type"), path
        assert got.status_code == (401 if path == "/v1/models" and not headers else 200), path
    posted_only = httpx.head(api_only.url + "/v1/chat/completions", headers=key)
    assert posted_only.status_code == 405, posted_only  # as its GET is


@pytest.mark.parametrize("style", ["bearer", "basic", "x-api-key"])
def test_every_way_clients_send_keys_works(api_only: Appliance, style: str) -> None:
    auth = {
        "bearer": {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}},
        "basic": {"auth": (ADMIN_KEY, "")},
        "x-api-key": {"headers": {"x-api-key": ADMIN_KEY}},
    }[style]
    reply = httpx.get(api_only.url + "/v1/llm/model-endpoints", **auth)  # type: ignore[arg-type]
    assert reply.status_code == 200


def test_a_key_is_shown_once_and_stored_only_as_a_digest(api_only: Appliance) -> None:
    admin = api_only.client()
    made = admin.post("/v1/api-keys", json={"name": "ci", "team": "red", "user": "ann"})
    assert made.status_code == 201, made.text
    text = made.json()["key"]
    listed = admin.get("/v1/api-keys").json()["api_keys"]
    assert all("key" not in row for row in listed)
    assert made.json()["id"] in [row["id"] for row in listed]
    with sqlite3.connect(api_only.data_dir / "appliance.db") as db:
        dump = "\n".join(db.iterdump())
    assert text not in dump and ADMIN_KEY not in dump
    assert text.split("_")[2] not in dump


def test_revoked_and_expired_keys_are_refused_within_a_second(api_only: Appliance) -> None:
    admin = api_only.client()
    made = admin.post("/v1/api-keys", json={"name": "short", "team": "red", "user": "ann"}).json()
    user = api_only.client(made["key"])
    assert user.get("/v1/llm/model-endpoints").status_code == 200
    assert admin.delete(f"/v1/api-keys/{made['id']}").status_code == 200
    revoked_at = time.monotonic()
    wait_until(
        lambda: user.get("/v1/llm/model-endpoints").status_code == 401,
        1.5,
        "the revoked key to be refused",
        every_s=0.05,
    )
    assert time.monotonic() - revoked_at <= 1.5

    brief = admin.post(
        "/v1/api-keys",
        json={"name": "brief", "team": "red", "user": "ann", "expires_in_seconds": 1},
    ).json()
    brief_client = api_only.client(brief["key"])
    assert brief_client.get("/v1/llm/model-endpoints").status_code == 200
    time.sleep(1.0)
    wait_until(
        lambda: brief_client.get("/v1/llm/model-endpoints").status_code == 401,
        1.5,
        "the expired key to be refused",
        every_s=0.05,
    )


def test_scopes_and_who_may_make_keys(api_only: Appliance) -> None:
    admin = api_only.client()
    infer = admin.post(
        "/v1/api-keys", json={"name": "i", "team": "red", "user": "ann", "scopes": ["inference"]}
    ).json()
    client = api_only.client(infer["key"])
    assert client.get("/v1/llm/model-endpoints").status_code == 403
    assert client.get("/v1/models").status_code == 200
    for refused in (  # managing keys needs the manage scope, its own keys included
        client.post("/v1/api-keys", json={"name": "more", "scopes": ["inference"]}),
        client.get("/v1/api-keys"),
        client.get(f"/v1/api-keys/{infer['id']}"),
        client.delete(f"/v1/api-keys/{infer['id']}"),
    ):
        assert refused.status_code == 403 and "manage" in refused.text, refused.text

    manager = admin.post("/v1/api-keys", json={"name": "m", "team": "red", "user": "ann"}).json()
    ann = api_only.client(manager["key"])
    own = ann.post("/v1/api-keys", json={"name": "laptop"})
    assert own.status_code == 201 and own.json()["team"] == "red" and own.json()["user"] == "ann"
    for body in (
        {"name": "x", "team": "blue"},
        {"name": "x", "admin": True},
        {"name": "x", "scopes": ["admin"]},
    ):
        assert ann.post("/v1/api-keys", json=body).status_code == 403, body
    assert ann.get(f"/v1/api-keys/{infer['id']}").status_code == 200
    other = admin.post("/v1/api-keys", json={"name": "b", "team": "blue", "user": "bob"}).json()
    assert ann.get(f"/v1/api-keys/{other['id']}").status_code == 404
    assert ann.delete(f"/v1/api-keys/{other['id']}").status_code == 404


def test_no_cross_origin_access_unless_configured(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    allowed = "https://apps.example.test"
    appliance = Appliance(
        tmp_path / "cors", redis, env_extra={"APPLIANCE_CORS_ORIGINS": json.dumps([allowed])}
    )
    try:
        appliance.start(roles=("api",))
        for origin, expected in ((allowed, allowed), ("https://evil.example.test", None)):
            preflight = httpx.options(
                appliance.url + "/v1/chat/completions",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert preflight.headers.get("access-control-allow-origin") == expected
    finally:
        appliance.stop()
        redis.stop()


def test_by_default_no_origin_is_allowed(api_only: Appliance) -> None:
    reply = httpx.get(
        api_only.url + "/v1/models",
        headers={"Origin": "https://apps.example.test", "Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert reply.status_code == 200
    assert "access-control-allow-origin" not in reply.headers


def test_a_limit_out_of_bounds_is_refused_naming_it_on_every_way_in(api_only: Appliance) -> None:
    admin = api_only.client()
    huge = 2**70  # more than SQLite's integers hold
    key = {"name": "k", "team": "red", "user": "ann"}
    made = admin.post("/v1/api-keys", json=key | {"max_tokens_per_request": huge})
    declared = admin.post(
        "/v1/config/apply", json={"keys": [key | {"limits": {"requests_per_minute": huge}}]}
    )
    for answer, name in ((made, "max_tokens_per_request"), (declared, "requests_per_minute")):
        assert answer.status_code == 422 and name in answer.text, answer.text
    listed = admin.get("/v1/api-keys").json()
    assert "k" not in [k["name"] for k in listed["api_keys"]], listed  # nothing half-made


def test_true_and_false_are_not_numbers(api_only: Appliance) -> None:
    """JSON's true is not 1: a number field sent a bool is refused naming it, on keys, the
    declared config and endpoints, and nothing is made (pydantic alone would take it as 1)."""
    admin = api_only.client()
    key = {"name": "b", "team": "red", "user": "ann"}
    answers = {
        "expires_in_seconds": admin.post("/v1/api-keys", json=key | {"expires_in_seconds": True}),
        "requests_per_minute": admin.post("/v1/api-keys", json=key | {"requests_per_minute": True}),
        "max_queued_tasks": admin.post(
            "/v1/config/apply", json={"keys": [key | {"limits": {"max_queued_tasks": False}}]}
        ),
        "gpus": admin.post(
            "/v1/llm/model-endpoints",
            json={"name": "b", "model_name": "m", "inference_framework": "vllm", "gpus": True},
        ),
    }
    for name, answer in answers.items():
        assert answer.status_code in (400, 422), (name, answer.text)
        assert name in answer.text and "expected a number, got" in answer.text, answer.text
    listed = admin.get("/v1/api-keys").json()["api_keys"]
    assert "b" not in [k["name"] for k in listed], listed
    assert admin.get("/v1/llm/model-endpoints/b").status_code == 404
    # a real bool field still takes one, and a number still counts
    fine = admin.post("/v1/api-keys", json=key | {"admin": False, "expires_in_seconds": 60})
    assert fine.status_code == 201, fine.text


def test_a_scope_named_twice_is_one_and_no_scope_at_all_is_refused(api_only: Appliance) -> None:
    admin = api_only.client()
    twice = admin.post("/v1/api-keys", json={"name": "twice", "scopes": ["inference"] * 2})
    assert twice.status_code == 201 and twice.json()["scopes"] == ["inference"], twice.text
    key = {"name": "none", "team": "red", "user": "ann", "scopes": []}
    for answer in (
        admin.post("/v1/api-keys", json=key),
        admin.post("/v1/config/apply", json={"keys": [key]}),
    ):
        assert answer.status_code == 422 and "scopes is empty" in answer.text, answer.text
    listed = admin.get("/v1/api-keys").json()["api_keys"]
    assert "none" not in [k["name"] for k in listed]


def test_a_key_is_made_with_limits_in_the_shape_it_is_listed_in(api_only: Appliance) -> None:
    """The listing, `GET /v1/config` and `/v1/config/apply` carry limits as `limits: {...}`:
    a create sending them so (copied from a listing) is honoured, as is the flat shape; a name
    sent both ways with two values is refused, naming it."""
    admin = api_only.client()
    nested = admin.post(
        "/v1/api-keys",
        json={"name": "nested", "limits": {"requests_per_minute": 7, "max_queued_tasks": 3}},
    )
    assert nested.status_code == 201, nested.text
    assert nested.json()["limits"]["requests_per_minute"] == 7
    assert nested.json()["limits"]["max_queued_tasks"] == 3
    flat = admin.post("/v1/api-keys", json={"name": "flat", "requests_per_minute": 5})
    assert flat.status_code == 201 and flat.json()["limits"]["requests_per_minute"] == 5
    both = admin.post(
        "/v1/api-keys",
        json={"name": "both", "requests_per_minute": 5, "limits": {"requests_per_minute": 6}},
    )
    assert both.status_code == 422 and "requests_per_minute" in both.text, both.text
    unknown = admin.post("/v1/api-keys", json={"name": "odd", "limits": {"per_hour": 1}})
    assert unknown.status_code == 422 and "per_hour" in unknown.text, unknown.text
    for shape in ([], "", 0, False, [{"requests_per_minute": 1}]):  # no object: was no limit
        odd = admin.post("/v1/api-keys", json={"name": "shape", "limits": shape})
        assert odd.status_code == 422 and "limits must be an object" in odd.text, (shape, odd.text)
        assert odd.json()["detail"][0]["msg"].startswith("limits must be an object")
    unset = admin.post("/v1/api-keys", json={"name": "unset", "limits": None})
    assert unset.status_code == 201 and unset.json()["limits"]["requests_per_minute"] is None


def test_an_export_with_a_rotated_key_applies_back(api_only: Appliance) -> None:
    """Rotating a key makes a second active key of its name before the first is revoked; the
    export then names that key once (keys are declared by team, user and name), so applying
    it back changes nothing instead of refusing the file ('is named twice')."""
    admin = api_only.client()
    for _ in range(2):
        made = admin.post("/v1/api-keys", json={"name": "ci", "scopes": ["inference"]})
        assert made.status_code == 201, made.text
    exported = admin.get("/v1/config").json()
    assert [k["name"] for k in exported["keys"]].count("ci") == 1
    applied = admin.post("/v1/config/apply", json=exported)
    assert applied.status_code == 200, applied.text
    pruned = admin.post("/v1/config/apply", params={"prune": "true"}, json=exported)
    assert pruned.status_code == 200, pruned.text  # both rows of the key it names are kept
    listed = admin.get("/v1/api-keys").json()["api_keys"]
    assert [k["name"] for k in listed if k["revoked_at"] is None].count("ci") == 2


def test_a_key_never_outlives_the_key_that_made_it(api_only: Appliance) -> None:
    """A team user's key that expires in 600 s made one with no expiry, and one for ten years;
    after the admin revoked it, they kept working. Now they expire with it, and go with it."""
    admin = api_only.client()
    red = api_only.client(make_key(api_only, "red"))
    parent = red.post("/v1/api-keys", json={"name": "brief", "expires_in_seconds": 600}).json()
    maker = api_only.client(parent["key"])

    forever = maker.post("/v1/api-keys", json={"name": "forever", "expires_in_seconds": 10**8})
    assert forever.status_code == 422, forever.text
    said = forever.json()["detail"]
    assert "expires_in_seconds" in said and "outlive" in said, said
    child = maker.post("/v1/api-keys", json={"name": "child"}).json()
    assert child["expires_at"] == parent["expires_at"]  # expires with its maker
    shorter = maker.post("/v1/api-keys", json={"name": "short", "expires_in_seconds": 60})
    assert shorter.status_code == 201 and shorter.json()["expires_at"] < parent["expires_at"]
    grandchild = api_only.client(child["key"]).post("/v1/api-keys", json={"name": "gc"}).json()
    sibling = red.post("/v1/api-keys", json={"name": "sibling"}).json()

    assert admin.delete(f"/v1/api-keys/{parent['id']}").status_code == 200
    for made in (child, shorter.json(), grandchild):
        gone = api_only.client(made["key"])
        wait_until(
            partial(lambda client: client.get("/v1/api-keys").status_code == 401, gone),
            1.5,
            f"key {made['name']} to go with the key that made it",
            every_s=0.05,
        )
    assert api_only.client(sibling["key"]).get("/v1/api-keys").status_code == 200
    revoked = admin.get("/v1/audit", params={"action": "key.revoke"}).json()["entries"]
    assert {e["target"] for e in revoked} == {
        parent["id"],
        child["id"],
        shorter.json()["id"],
        grandchild["id"],
    }
    listed = {k["id"]: k for k in admin.get("/v1/api-keys").json()["api_keys"]}
    assert listed[grandchild["id"]]["revoked_at"] is not None


def test_a_revoked_key_makes_no_key_in_the_second_it_is_still_known(api_only: Appliance) -> None:
    """A key is known valid for up to a second after its revocation (the key cache); in that
    second a key made with it, or with a key revoked with it, stayed active and working for
    good, so revoking a leaked key did not stop whoever held it. A key is made only while the
    key making it is valid, read in the same transaction as the revocation writes."""
    admin = api_only.client()
    red = api_only.client(make_key(api_only, "red"))
    parent = red.post("/v1/api-keys", json={"name": "leaked"}).json()
    child = api_only.client(
        api_only.client(parent["key"]).post("/v1/api-keys", json={"name": "child"}).json()["key"]
    )
    lone = admin.post("/v1/api-keys", json={"name": "lone", "team": "red", "user": "bo"}).json()
    alone = api_only.client(lone["key"])
    assert child.get("/v1/api-keys").status_code == 200  # both known valid from here
    assert alone.get("/v1/api-keys").status_code == 200

    assert admin.delete(f"/v1/api-keys/{parent['id']}").status_code == 200
    assert admin.delete(f"/v1/api-keys/{lone['id']}").status_code == 200
    for client, name in ((child, "escape"), (alone, "escape-too")):
        made = client.post("/v1/api-keys", json={"name": name})
        assert made.status_code == 401, made.text
        assert "revoked" in made.json()["detail"], made.text
    names = {k["name"]: k for k in admin.get("/v1/api-keys").json()["api_keys"]}
    assert "escape" not in names and "escape-too" not in names


def test_the_last_active_administrator_key_is_not_revoked_or_demoted(
    api_only: Appliance,
) -> None:
    """Revoking (or demoting) the only active administrator key left nobody able to manage
    keys or read the audit log, for good: no new one is made at start while one exists, even
    revoked. With a second administrator key, either may go."""
    admin = api_only.client()
    [mine] = [k for k in admin.get("/v1/api-keys").json()["api_keys"] if k["admin"]]
    refused = admin.delete(f"/v1/api-keys/{mine['id']}")
    assert refused.status_code == 409, refused.text
    assert "last active administrator key" in refused.json()["detail"]
    demoted = admin.post(
        "/v1/config/apply",
        json={"keys": [{"name": mine["name"], "team": "admin", "user": "admin", "admin": False}]},
    )
    assert demoted.status_code == 409 and "last active administrator" in demoted.text
    assert admin.get("/v1/api-keys").status_code == 200  # still an administrator

    second = admin.post("/v1/api-keys", json={"name": "ops", "team": "admin", "admin": True})
    assert second.status_code == 201, second.text
    assert admin.delete(f"/v1/api-keys/{mine['id']}").status_code == 200
    ops = api_only.client(second.json()["key"])
    assert ops.delete(f"/v1/api-keys/{second.json()['id']}").status_code == 409
