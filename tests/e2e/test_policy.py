"""The container policy: requests that would run a privileged container, mount a host path
outside the models directory, preload a library, use the host network or run an image no
administrator approved are refused with a 400 and a message, and Docker creates nothing."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.db import open_engine, session_scope
from appliance.models import Endpoint
from tests.e2e.lifecycle import ON_FAKE_GPUS, create, standin_body
from tests.harness import Appliance, make_key, wait_until


def gemma(**fields: Any) -> dict[str, Any]:
    return {
        "name": "bad",
        "model_name": "gemma",
        "inference_framework": "llamacpp",
        "checkpoint_path": "ok.gguf",
        "min_workers": 1,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
        **fields,
    }


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "ok.gguf").write_bytes(b"GGUF")
    (models / "escape").symlink_to("/etc")
    (tmp_path / "secret.gguf").write_bytes(b"GGUF")
    return models


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("privileged", gemma(privileged=True), "privileged"),
    ("host network", gemma(network_mode="host"), "network_mode"),
    ("host volume field", gemma(volumes=["/:/host"]), "volumes"),
    ("dot-dot path", gemma(checkpoint_path="../secret.gguf"), "outside the models directory"),
    ("dot-dot in the middle", gemma(checkpoint_path="sub/../../secret.gguf"), "outside"),
    ("symlink out", gemma(checkpoint_path="escape/passwd"), "outside the models directory"),
    ("LD_PRELOAD", gemma(env={"LD_PRELOAD": "/tmp/x.so"}), "LD_PRELOAD"),
    ("PATH", gemma(env={"PATH": "/tmp"}), "PATH"),
    (
        "unlisted vLLM flag",
        standin_body("bad", extra_flags={"--worker-extension-cls": "x"}),
        "--worker-extension-cls",
    ),
]


def docker_creates(install_id: str, since: float) -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            "docker",
            "events",
            "--since",
            str(since),
            "--until",
            str(time.time()),
            "--filter",
            "type=container",
            "--filter",
            "event=create",
            "--filter",
            f"label=appliance.install={install_id}",
            "--format",
            "{{json .}}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_policy_violations_are_refused_and_create_nothing(
    make_appliance: Callable[..., Appliance],
    models_dir: Path,
) -> None:
    appliance = make_appliance(APPLIANCE_MODELS_DIR=str(models_dir))
    client = appliance.client()
    since = time.time()
    for what, body, needle in BAD_REQUESTS:
        reply = client.post("/v1/model-endpoints", json=body)
        assert reply.status_code == 400, f"{what}: {reply.status_code} {reply.text}"
        assert needle in reply.text, f"{what}: the message should name {needle!r}: {reply.text}"

    user = appliance.client(make_key(appliance, "team-b"))
    for what, body in [
        (
            "image override",
            gemma(model_name="ok", checkpoint_path="ok.gguf", image="evil/miner:latest"),
        ),
        (
            "custom image",
            {
                **gemma(checkpoint_path="ok.gguf"),
                "inference_framework": "custom",
                "image": "evil/miner:latest",
                "command": ["sh"],
            },
        ),
    ]:
        reply = user.post("/v1/model-endpoints", json=body)
        assert reply.status_code == 400, f"{what}: {reply.status_code} {reply.text}"
        assert "administrator" in reply.text
    admin_unapproved = client.post(
        "/v1/model-endpoints", json=gemma(checkpoint_path="ok.gguf", image="evil/miner:latest")
    )
    assert admin_unapproved.status_code == 400 and "not approved" in admin_unapproved.text

    assert client.get("/v1/model-endpoints").json() == {"model_endpoints": []}
    time.sleep(1)
    assert docker_creates(appliance.install_id(), since) == []


def test_a_stored_flag_the_policy_now_refuses_starts_no_container(
    make_appliance: Callable[..., Appliance],
) -> None:
    """The builder checks a vLLM endpoint's extra flags again before it starts a replica: a row
    stored before a rule came (a config key naming a plugin, which vLLM imports) fails to
    start saying why, and Docker creates nothing."""
    appliance = make_appliance(**ON_FAKE_GPUS)
    client = appliance.client()
    endpoint_id = create(client, standin_body("stored", min_workers=0, max_workers=0))
    since = time.time()
    plugin = json.dumps({"reasoning_parser_plugin": "/root/.cache/huggingface/evil.py"})
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:  # as a release before the rule stored it
        row = session.get(Endpoint, endpoint_id)
        assert row is not None
        row.args = {**row.args, "extra_flags": {"--structured-outputs-config": plugin}}
        row.min_replicas = row.max_replicas = 1
        session.add(row)
    engine.dispose()

    def refused_start() -> list[str]:
        events = client.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
        return [e["message"] for e in events if "names code for the server" in e["message"]]

    said = wait_until(refused_start, 60, "the replica refused at start")
    assert "failed to start" in said[0] and "reasoning_parser_plugin" in said[0], said
    assert docker_creates(appliance.install_id(), since) == []
