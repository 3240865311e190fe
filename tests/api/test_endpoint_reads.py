"""What an endpoint's GETs give back of what it was created with: LLM Engine's GET carries
every field of upstream's response models, its resources in the form they were sent (`"7Gi"`,
`2`), which LLM Engine's own client reads and which, sent back, change nothing; the
appliance's GET and the endpoint's page show its server settings; the events say memory in
the units it was given; a batch job's GET gives back the model_config it was sent."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from sqlmodel import select

from appliance.db import open_engine, session_scope
from appliance.models import Endpoint, EndpointStatus
from tests.api.test_llmengine_compat import run_client_script, seed
from tests.harness import Appliance

CREATED = {  # as LLM Engine's client sends them, server settings flattened into the body
    "cpus": 2,
    "memory": "7Gi",
    "max_model_len": 1024,
    "dtype": "bfloat16",
    "seed": 7,
    "max_num_seqs": 8,
    "enforce_eager": True,
}
SETTINGS = ("max_model_len", "dtype", "seed", "max_num_seqs", "enforce_eager")

SCRIPT = textwrap.dedent("""
    import json, sys
    from llmengine import Model
    made = Model.create(
        name="gemma", model="google/gemma-3-270m", inference_framework_image_tag="latest",
        num_shards=1, gpus=0, min_workers=0, max_workers=1, per_worker=2,
        labels={"team": "ml", "product": "demo"}, **json.loads(sys.argv[1]))
    got = Model.get("gemma")
    state = got.spec.resource_state
    print(json.dumps({"id": made.endpoint_creation_task_id, "cpus": state.cpus,
                      "memory": state.memory}))
""")

# GetLLMModelEndpointV1Response and GetModelEndpointV1Response (with their states), as
# LLM Engine's server declares them (model_engine_server/common/dtos).
LLM_FIELDS = {
    "id", "name", "model_name", "source", "status", "inference_framework",
    "inference_framework_image_tag", "num_shards", "quantize", "checkpoint_path",
    "chat_template_override", "task_expires_seconds", "queue_message_timeout_seconds", "spec",
}  # fmt: skip
SPEC_FIELDS = {
    "id", "name", "endpoint_type", "destination", "deployment_name", "metadata", "bundle_name",
    "status", "status_reason", "post_inference_hooks", "default_callback_url",
    "default_callback_auth", "labels", "aws_role", "results_s3_bucket", "created_by",
    "created_at", "last_updated_at", "deployment_state", "resource_state", "num_queued_items",
    "public_inference", "task_expires_seconds", "queue_message_timeout_seconds",
}  # fmt: skip
RESOURCE_FIELDS = {
    "cpus", "gpus", "memory", "gpu_type", "storage", "nodes_per_worker", "optimize_costs",
}  # fmt: skip


def create_with_client(appliance: Appliance) -> dict[str, Any]:
    return run_client_script(appliance, SCRIPT, json.dumps(CREATED))


def deployed(appliance: Appliance, name: str) -> None:
    """The endpoint READY, as a builder would leave it (this api runs alone), so it takes edits."""
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        for row in session.exec(select(Endpoint).where(Endpoint.name == name)):
            row.status = EndpointStatus.READY
            session.add(row)
    engine.dispose()


def test_the_get_gives_back_what_the_endpoint_was_created_with(api_only: Appliance) -> None:
    made = create_with_client(api_only)
    # as the client reads them (its CpuSpecificationType tries str first)
    assert (made["cpus"], made["memory"]) == ("2", "7Gi")
    admin = api_only.client()
    got = admin.get("/v1/llm/model-endpoints/gemma").json()
    spec = got["spec"]
    assert set(got) >= LLM_FIELDS, LLM_FIELDS - set(got)
    assert set(spec) >= SPEC_FIELDS, SPEC_FIELDS - set(spec)
    assert set(spec["resource_state"]) >= RESOURCE_FIELDS
    assert spec["resource_state"]["memory"] == "7Gi"
    assert spec["resource_state"]["cpus"] == 2
    assert spec["num_queued_items"] == 0
    assert got["task_expires_seconds"] is None and spec["aws_role"] is None

    # The appliance's own GET shows the server settings it was created with.
    own = admin.get(f"/v1/model-endpoints/{made['id']}").json()
    assert {k: own["server_settings"].get(k) for k in SETTINGS} == {k: CREATED[k] for k in SETTINGS}

    # Sent back as the GET shows them, the resources are no change; a new memory is one,
    # and the events say it in the units it was written in.
    deployed(api_only, "gemma")
    resources = {k: spec["resource_state"][k] for k in ("cpus", "memory")}
    assert admin.put("/v1/llm/model-endpoints/gemma", json=resources).status_code == 200
    assert admin.put("/v1/llm/model-endpoints/gemma", json={"memory": "8Gi"}).status_code == 200
    events = admin.get(f"/v1/model-endpoints/{made['id']}/events").json()["events"]
    updates = [e["message"] for e in events if e["kind"] == "updated"]
    assert len(updates) == 1 and "memory 7Gi → 8Gi" in updates[0], updates


def test_the_callback_auth_is_shown_without_its_secret(api_only: Appliance) -> None:
    admin = api_only.client()
    auth = {"kind": "basic", "username": "hook", "password": "s3cret-pass"}
    body = {
        "name": "hooked",
        "model_name": "google/gemma-3-270m",
        "inference_framework": "vllm",
        "gpus": 0,
        "cpus": 1,
        "memory": "2Gi",
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
        "default_callback_url": "https://93.184.216.34/done",
        "default_callback_auth": auth,
    }
    assert admin.post("/v1/llm/model-endpoints", json=body).status_code == 200
    got = admin.get("/v1/llm/model-endpoints/hooked")
    assert "s3cret-pass" not in got.text
    shown = got.json()["spec"]["default_callback_auth"]
    assert (shown["kind"], shown["username"]) == ("basic", "hook")
    # sent back as shown, it changes nothing (the secret stays)
    deployed(api_only, "hooked")
    back = {"default_callback_auth": shown}
    assert admin.put("/v1/llm/model-endpoints/hooked", json=back).status_code == 200
    endpoint_id = got.json()["id"]
    events = admin.get(f"/v1/model-endpoints/{endpoint_id}/events").json()["events"]
    assert not [e for e in events if e["kind"] == "updated"]


def test_a_batch_jobs_get_gives_back_its_model_config(api_only: Appliance) -> None:
    seed(api_only)
    admin = api_only.client()
    config = {"model": "llama", "num_shards": 1, "trust_remote_code": False, "labels": {}}
    body = {
        "model_config": config,
        "output_data_path": "out.jsonl",
        "content": {"prompts": ["a"], "max_new_tokens": 2, "temperature": 0},
    }
    made = admin.post("/v2/batch-completions", json=body)
    assert made.status_code == 200, made.text
    got = admin.get(f"/v2/batch-completions/{made.json()['job_id']}").json()["job"]
    assert got["model_config"] == made.json()["model_config"] == config
    assert set(got["metadata"]) >= {"output_data_path", "total"}
    assert not any(v.startswith("{") for v in got["metadata"].values())


def test_lists_take_llm_engines_orders_and_refuse_any_other(api_only: Appliance) -> None:
    """`order_by` is LLM Engine's `newest` or `oldest` (the default); anything else was
    taken and ignored, and is now a 400 naming it on both list routes."""
    admin = api_only.client()
    for name in ("first", "second"):
        body = {"name": name, "model_name": "google/gemma-3-270m", "gpus": 0, "min_workers": 0}
        made = admin.post("/v1/llm/model-endpoints", json=body)
        assert made.status_code == 200, made.text
    for route in ("/v1/llm/model-endpoints", "/v1/model-endpoints"):
        newest = admin.get(route, params={"order_by": "newest"}).json()["model_endpoints"]
        oldest = admin.get(route, params={"order_by": "oldest"}).json()["model_endpoints"]
        names = [e["name"] for e in oldest if e["name"] in ("first", "second")]
        assert names == ["first", "second"]
        assert [e["name"] for e in newest if e["name"] in names] == names[::-1]
        refused = admin.get(route, params={"order_by": "sideways"})
        assert refused.status_code == 400, refused.text
        assert "order_by" in refused.text, refused.text


def test_labels_and_metadata_are_bounded_as_stored(api_only: Appliance) -> None:
    """Every list and GET answers an endpoint's labels and metadata whole: unbounded, one team
    stored 1.9 MB of labels in each of its endpoints, and 16 lists at once of ten of them took
    the api from 423 to 978 MB and 20 s. At most 64 labels (keys of 128 characters, values of
    256) and 64 KiB of metadata as stored, after an update's merge too; more is refused
    naming the field, and nothing changes."""
    admin = api_only.client()
    body = {"name": "tagged", "model_name": "google/gemma-3-270m", "gpus": 0, "min_workers": 0}
    most = {f"k{i:02d}" + "k" * 125: "v" * 256 for i in range(64)}
    made = admin.post("/v1/llm/model-endpoints", json={**body, "labels": most})
    assert made.status_code == 200, made.text
    deployed(api_only, "tagged")
    for field, value in (
        ("labels", {**most, "one-more": "v"}),
        ("labels", {"k" * 129: "v"}),
        ("labels", {"k": "v" * 257}),
        ("metadata", {"blob": "x" * 70_000}),
    ):
        refused = admin.post("/v1/llm/model-endpoints", json={**body, "name": "x", field: value})
        assert refused.status_code == 400, (field, refused.text)
        assert field in refused.json()["detail"], refused.text
        changed = admin.put("/v1/llm/model-endpoints/tagged", json={field: value})
        assert changed.status_code == 400, (field, changed.text)
    half = {"a": "x" * 40_000}
    assert admin.put("/v1/llm/model-endpoints/tagged", json={"metadata": half}).status_code == 200
    merged = admin.put("/v1/llm/model-endpoints/tagged", json={"metadata": {"b": "x" * 40_000}})
    assert merged.status_code == 400 and "metadata" in merged.json()["detail"], merged.text
    stored = admin.get("/v1/llm/model-endpoints/tagged").json()["spec"]
    assert stored["metadata"] == half and stored["labels"] == most
