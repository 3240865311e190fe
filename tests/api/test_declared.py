"""Configuration as code through the `appliance` CLI against real installs: an exported file
applied on a second install reproduces its endpoints and keys, applying it again changes
nothing, `--prune` removes what it does not name; a team's key speaks for its team only; and
`export --format llm-engine` writes requests LLM Engine's own client model parses."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.lifecycle import standin_body
from tests.harness import ADMIN_KEY, Appliance, RedisServer

Installs = tuple[Appliance, Appliance]


@pytest.fixture
def two_installs(tmp_path: Path) -> Iterator[Installs]:
    """Two api-only installs whose models directory holds a (dummy) GGUF file."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(b"GGUF")
    made: list[tuple[Appliance, RedisServer]] = []
    for name in ("first", "second"):
        redis = RedisServer(tmp_path / f"redis-{name}").start()
        env = {"APPLIANCE_MODELS_DIR": str(models)}
        made.append((Appliance(tmp_path / name, redis, env_extra=env).start(("api",)), redis))
    yield made[0][0], made[1][0]
    for appliance, redis in made:
        print(appliance.logs())
        appliance.stop()
        redis.stop()


def cli(appliance: Appliance, *args: str, key: str = ADMIN_KEY) -> str:
    env = {**appliance.env(), "APPLIANCE_ADMIN_KEY": ""}
    done = subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--url", appliance.url, "--key", key],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def populate(admin: httpx.Client) -> None:
    bodies = [
        standin_body(
            "chat",
            gpus=0,
            max_model_len=2048,
            enforce_eager=True,
            disable_log_requests=True,  # stored as vLLM's enable_log_requests
            chat_template_override="{{ messages }}",
            extra_flags={"--max-logprobs": 5},
            env={"VLLM_LOGGING_LEVEL": "DEBUG"},
            labels={"product": "support"},
            metadata={"owner": "ml platform"},
            min_workers=0,
            max_workers=3,
            idle_timeout_seconds=60,
        ),
        standin_body("jobs", gpus=0, endpoint_type="async", cpus="500m", memory="2Gi"),
        {
            "name": "tiny",
            "model_name": "tiny.gguf",
            "inference_framework": "llamacpp",
            "min_workers": 1,
            "max_workers": 1,
            "public_inference": False,
            "max_model_len": 1024,
        },
    ]
    for body in bodies:
        reply = admin.post("/v1/llm/model-endpoints", json=body)
        assert reply.status_code == 200, reply.text
    limited = {"name": "ci", "team": "red", "user": "rosa", "requests_per_minute": 60}
    assert admin.post("/v1/api-keys", json=limited).status_code == 201


def state_of(appliance: Appliance) -> dict[str, Any]:
    """What a second apply must not change: generations, events, audit entries, keys."""
    with sqlite3.connect(appliance.data_dir / "appliance.db") as db:
        return {
            "generations": db.execute("SELECT name, generation FROM endpoint").fetchall(),
            "events": db.execute("SELECT COUNT(*) FROM event").fetchone(),
            "audit": db.execute("SELECT COUNT(*) FROM audit").fetchone(),
            "keys": db.execute("SELECT COUNT(*) FROM api_key").fetchone(),
        }


def test_apply_reproduces_an_export_once_and_prunes(two_installs: Installs, tmp_path: Path) -> None:
    first, second = two_installs
    populate(first.client())
    exported = tmp_path / "appliance.yaml"
    cli(first, "export", "-o", str(exported))
    document = yaml.safe_load(exported.read_text())
    assert [e["name"] for e in document["endpoints"]] == ["chat", "jobs", "tiny"]
    assert "mea_" not in exported.read_text()  # names, teams, scopes, limits: no secrets

    applied = cli(second, "apply", "-f", str(exported))
    assert "created endpoint chat" in applied and "created key ci (rosa · red)" in applied
    new_key = applied.split("key (shown once): ")[1].split()[0]
    assert httpx.get(second.url + "/v1/api-keys", headers={"x-api-key": new_key}).is_success
    again = tmp_path / "again.yaml"
    cli(second, "export", "-o", str(again))
    assert yaml.safe_load(again.read_text()) == document

    before = state_of(second)
    twice = cli(second, "apply", "-f", str(exported))
    assert "created" not in twice and "updated" not in twice
    assert state_of(second) == before

    # An edit in the file rolls one endpoint; an endpoint the file does not name survives
    # an apply and goes with --prune, as does a key the file does not name.
    admin = second.client()
    extra = admin.post("/v1/llm/model-endpoints", json=standin_body("stray", gpus=0))
    assert extra.status_code == 200
    assert admin.post("/v1/api-keys", json={"name": "old", "team": "red", "user": "x"}).is_success
    document["endpoints"][1]["max_workers"] = 4
    exported.write_text(yaml.safe_dump(document))
    with sqlite3.connect(second.data_dir / "appliance.db") as db:
        db.execute("UPDATE endpoint SET status = 'READY'")  # the builder's part; none runs
    before = state_of(second)
    dry = cli(second, "apply", "-f", str(exported), "--prune", "--dry-run")
    assert "would update endpoint jobs: max replicas 1 → 4" in dry, dry
    assert "would delete endpoint stray" in dry and "would revoke key old (x · red)" in dry
    assert "updated" not in dry and "deleted" not in dry and state_of(second) == before
    edited = cli(second, "apply", "-f", str(exported))
    assert "updated endpoint jobs: max replicas 1 → 4" in edited
    assert admin.get("/v1/llm/model-endpoints/stray").status_code == 200
    pruned = cli(second, "apply", "-f", str(exported), "--prune")
    assert "deleted endpoint stray" in pruned and "revoked key old (x · red)" in pruned
    assert admin.get("/v1/llm/model-endpoints/stray").json()["status"] == "DELETE_IN_PROGRESS"
    no_keys = admin.post("/v1/config/apply", params={"prune": True}, json={"keys": []})
    assert no_keys.json()["keys"]["revoked"] == ["ci (rosa · red)"]  # never the key applying it
    assert admin.get("/v1/api-keys").is_success
    assert admin.get("/v1/llm/model-endpoints/chat").is_success  # no endpoints section: kept


def test_a_team_key_speaks_for_its_team_and_bad_files_change_nothing(
    two_installs: Installs, tmp_path: Path
) -> None:
    first, _ = two_installs
    admin = first.client()
    populate(admin)
    made = admin.post("/v1/api-keys", json={"name": "red", "team": "red", "user": "rosa"})
    red_key = made.json()["key"]
    red = first.client(red_key)
    assert red.post("/v1/llm/model-endpoints", json=standin_body("red-one", gpus=0)).is_success
    document = yaml.safe_load(cli(first, "export", key=red_key))
    assert [e["name"] for e in document["endpoints"]] == ["red-one"]
    assert "keys" not in document
    refused = red.post("/v1/config/apply", json={**document, "keys": []})
    assert refused.status_code == 403
    document["endpoints"].append({"team": "admin", **standin_body("sneaky", gpus=0)})
    assert red.post("/v1/config/apply", json=document).status_code == 403

    before = state_of(first)
    bad = {"endpoints": [standin_body("fine", gpus=0), standin_body("broken", max_workers=-1)]}
    reply = admin.post("/v1/config/apply", json=bad)
    assert reply.status_code == 422 and "endpoints[1].max_workers" in reply.json()["detail"]
    assert state_of(first) == before  # the good entry was not created either


def test_llm_engine_export_parses_with_the_llmengine_client(
    two_installs: Installs,
) -> None:
    first, _ = two_installs
    populate(first.client())
    text = cli(first, "export", "--format", "llm-engine")
    documents = [d for d in yaml.safe_load_all(text) if d]
    # LLM Engine has no llama.cpp: tiny (a GGUF on CPU) is left out, saying why, rather than
    # written as a vLLM endpoint on a GPU
    assert [d["name"] for d in documents] == ["chat", "jobs"]
    assert "# skipped tiny (team admin): a llama.cpp endpoint" in text
    answer = first.client().get("/v1/config", params={"format": "llm-engine"}).json()
    assert [e["request"]["name"] for e in answer["endpoints"]] == ["chat", "jobs"]
    [skipped] = answer["skipped"]
    assert skipped["name"] == "tiny" and "no llama.cpp" in skipped["reason"]
    os.environ.setdefault("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")
    from llmengine.data_types import CreateLLMEndpointRequest

    known = set(CreateLLMEndpointRequest.__fields__)
    for document in documents:
        parsed = CreateLLMEndpointRequest.parse_obj(document)
        assert set(document) <= known, set(document) - known  # nothing silently dropped
        assert parsed.labels["team"] == "admin" and parsed.num_shards == parsed.gpus
    chat = CreateLLMEndpointRequest.parse_obj(documents[0])
    assert chat.max_model_len == 2048 and chat.chat_template_override == "{{ messages }}"


def test_an_export_applied_back_keeps_the_callback_auth_it_could_not_carry(
    api_only: Appliance,
) -> None:
    """The export leaves a default callback's secret out; applying it back keeps the stored
    auth (it said "settings changed (default_callback_auth)" and dropped it), and an entry
    that sends it as null clears it."""
    admin = api_only.client()
    body = standin_body("hooked", gpus=0, min_workers=0) | {
        "default_callback_url": "https://93.184.216.34/hook",
        "default_callback_auth": {"kind": "basic", "username": "u", "password": "S3CRETPW"},
    }
    assert admin.post("/v1/llm/model-endpoints", json=body).status_code == 200
    exported = admin.get("/v1/config").json()
    assert "S3CRETPW" not in str(exported)
    again = admin.post("/v1/config/apply", params={"dry_run": "true"}, json=exported)
    assert again.status_code == 200, again.text
    assert "default_callback_auth" not in again.text, again.text
    (entry,) = [e for e in exported["endpoints"] if e["name"] == "hooked"]
    entry["default_callback_auth"] = None
    cleared = admin.post("/v1/config/apply", params={"dry_run": "true"}, json=exported)
    assert "default_callback_auth" in cleared.text, cleared.text
