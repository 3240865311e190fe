"""LLM Engine's own Python client (`llmengine`, PyPI scale-llm-engine) manages endpoints on the
appliance unchanged: Model.create, get, list and delete."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

from tests.e2e.lifecycle import ON_FAKE_GPUS
from tests.harness import ADMIN_KEY, Appliance, wait_until

CLIENT_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from llmengine import Model
    step = sys.argv[1]
    if step == "create":
        made = Model.create(name="client-made", model="acme/standin-1b",
                            inference_framework_image_tag="latest", num_shards=1, gpus=1,
                            min_workers=1, max_workers=1, per_worker=2,
                            labels={"team": "ml", "product": "demo"})
        print(json.dumps({"task": made.endpoint_creation_task_id}))
    elif step == "get":
        got = Model.get("client-made")
        print(json.dumps({"name": got.name, "status": got.status.value,
                          "framework": got.inference_framework.value,
                          "shards": got.num_shards, "spec_status": got.spec.status.value}))
    elif step == "list":
        print(json.dumps({"names": [m.name for m in Model.list().model_endpoints]}))
    elif step == "delete":
        print(json.dumps({"deleted": Model.delete("client-made").deleted}))
""")


def run_client(appliance: Appliance, step: str) -> str:
    env = {
        **os.environ,
        "LLM_ENGINE_BASE_PATH": appliance.url + "/",
        "SCALE_API_KEY": ADMIN_KEY,
        "LLM_ENGINE_DISABLE_VERSION_CHECK": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, step],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_llmengine_client_creates_gets_lists_and_deletes(
    make_appliance: Callable[..., Appliance],
) -> None:
    import json

    appliance = make_appliance(**ON_FAKE_GPUS)
    assert json.loads(run_client(appliance, "create"))["task"].startswith("end_")
    wait_until(
        lambda: json.loads(run_client(appliance, "get"))["status"] == "READY",
        60,
        "the client to see READY",
    )
    got = json.loads(run_client(appliance, "get"))
    assert got == {
        "name": "client-made",
        "status": "READY",
        "framework": "vllm",
        "shards": 1,
        "spec_status": "READY",
    }
    assert json.loads(run_client(appliance, "list")) == {"names": ["client-made"]}
    assert json.loads(run_client(appliance, "delete")) == {"deleted": True}
    wait_until(lambda: appliance.containers() == [], 30, "the replica to be removed")
