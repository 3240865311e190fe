"""LLM Engine's own client (`llmengine`, the pinned scale-llm-engine) against an install where
endpoints of every framework and type are visible at once: its parsers know only vLLM and the
`streaming` type, yet Model.list and Model.get work for all of them, Model.update keeps what it
did not mean to change (and what it sends back as it is changes nothing), and what the
appliance lacks (fine-tuning) fails in the client's words.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from appliance import bus
from appliance.db import open_engine, session_scope
from appliance.models import Endpoint, EndpointStatus
from tests.harness import ADMIN_KEY, Appliance, RedisServer

ROWS = (  # name, framework, type, model
    ("llama", "llamacpp", "sync", "/models/gemma.gguf"),
    ("vllm-async", "vllm", "async", "acme/standin-1b"),
    ("vllm-stream", "vllm", "streaming", "acme/standin-1b"),
    ("custom-echo", "custom", "sync", "custom"),
)

SCRIPT = textwrap.dedent("""
    import json, sys
    from llmengine import File, FineTune, Model
    out = {}
    step = sys.argv[1]
    if step == "download":
        try:
            out["urls"] = Model.download(sys.argv[2]).urls
        except Exception as exc:
            out["error"] = [type(exc).__name__, str(exc)]
    if step == "files":  # argv[2]: the id of a file OpenAI's SDK uploaded
        made = File.upload(open(sys.argv[3], "rb"))
        got = File.get(made.id)
        out["mine"] = [made.id, got.filename, got.size, File.download(made.id).content]
        theirs = File.get(sys.argv[2])
        out["theirs"] = [theirs.filename, theirs.size, File.download(sys.argv[2]).content]
        out["listed"] = sorted(f.id for f in File.list().files)
        out["deleted"] = File.delete(sys.argv[2]).deleted
        try:
            File.get(sys.argv[2])
        except Exception as exc:
            out["missing"] = [type(exc).__name__, str(exc)]
    if step == "read":
        out["made"] = Model.create(
            name="client-made", model="acme/standin-1b", inference_framework_image_tag="latest",
            num_shards=1, gpus=1, min_workers=0, max_workers=1, per_worker=2,
            labels={"team": "ml", "product": "demo"}).endpoint_creation_task_id
        out["with_made"] = sorted(m.name for m in Model.list().model_endpoints)
        out["deleted"] = Model.delete("client-made").deleted
        out["after"] = sorted(
            m.name for m in Model.list().model_endpoints if m.status.value != "DELETE_IN_PROGRESS"
        )
        out["list"] = sorted(
            (m.name, m.inference_framework.value, m.spec.endpoint_type.value)
            for m in Model.list().model_endpoints
        )
        got = Model.get("llama")
        out["get"] = [got.name, got.status.value, got.inference_framework.value]
    elif step == "update":
        for name in ("vllm-stream", "llama"):
            Model.update(name, max_workers=2)
    elif step == "update-llama":  # argv[2]: a JSON list of Model.update keyword sets
        for kwargs in json.loads(sys.argv[2]):
            try:
                Model.update("llama", **kwargs)
                out.setdefault("errors", []).append(None)
            except Exception as exc:
                out.setdefault("errors", []).append([type(exc).__name__, str(exc)])
    elif step == "refused":  # what the client raises for requests the appliance refuses
        made = dict(
            model="acme/standin-1b", inference_framework_image_tag="latest", num_shards=1,
            gpus=1, min_workers=0, max_workers=1, per_worker=2, labels={"team": "ml"})
        for call in (
            lambda: Model.create(name="llama", **made),  # the name exists
            lambda: Model.create(name="too-big", **{**made, "memory": "1Ki"}),
            lambda: Model.update("llama", min_workers=3, max_workers=1),
            lambda: Model.get("nowhere"),
        ):
            try:
                call()
                out.setdefault("errors", []).append(None)
            except Exception as exc:
                out.setdefault("errors", []).append([type(exc).__name__, str(exc)])
    elif step == "no-gpus":  # Model.create as its docs show it, on a box without GPUs
        try:
            Model.create(
                name="cpu-box", model="acme/standin-1b", inference_framework_image_tag="latest",
                min_workers=0, max_workers=1, per_worker=2)
        except Exception as exc:
            out["error"] = [type(exc).__name__, str(exc)]
    elif step == "finetune":
        for call in (
            lambda: FineTune.create(model="llama", training_file="file_x"),
            lambda: FineTune.get("ft_x"),
            lambda: FineTune.list(),
            lambda: FineTune.cancel("ft_x"),
            lambda: FineTune.get_events("ft_x"),
        ):
            try:
                call()
                out.setdefault("errors", []).append(None)
            except Exception as exc:
                out.setdefault("errors", []).append([type(exc).__name__, str(exc)])
    print(json.dumps(out))
""")


def seed(appliance: Appliance) -> None:
    """Endpoint rows of every framework and type, each with metadata and labels."""
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        for name, framework, kind, model in ROWS:
            session.add(
                Endpoint(
                    id=f"end_{name}",
                    name=name,
                    owner="admin",
                    created_by="admin",
                    framework=framework,
                    model=model,
                    image="approved/echo:1" if framework == "custom" else None,
                    endpoint_type=kind,
                    gpus=0,
                    public_inference=True,
                    labels={"team": "ml", "product": name},
                    extra={"metadata": {"owner_note": f"keep {name}"}, "quantize": "fp8"},
                    status=EndpointStatus.READY,
                )
            )
    engine.dispose()


def client(appliance: Appliance, step: str, *args: str) -> dict[str, Any]:
    return run_client_script(appliance, SCRIPT, step, *args)


def run_client_script(appliance: Appliance, script: str, *args: str) -> dict[str, Any]:
    """Runs `script` (Python using the real `llmengine` client, pointed at the appliance with
    the admin key) in its own process; the JSON of the last line it printed."""
    env = {
        **os.environ,
        "LLM_ENGINE_BASE_PATH": appliance.url + "/",
        "SCALE_API_KEY": ADMIN_KEY,
        "LLM_ENGINE_DISABLE_VERSION_CHECK": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    reply: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return reply


def test_client_lists_and_gets_endpoints_of_every_framework_and_type(api_only: Appliance) -> None:
    seed(api_only)
    read = client(api_only, "read")
    assert read["made"].startswith("end_")
    assert read["with_made"] == ["client-made", "custom-echo", "llama", "vllm-async", "vllm-stream"]
    assert read["deleted"] is True
    assert read["after"] == ["custom-echo", "llama", "vllm-async", "vllm-stream"]
    assert read["list"] == [  # client-made is DELETE_IN_PROGRESS (there is no builder here)
        ["client-made", "vllm", "streaming"],
        ["custom-echo", "vllm", "streaming"],
        ["llama", "vllm", "streaming"],
        ["vllm-async", "vllm", "streaming"],
        ["vllm-stream", "vllm", "streaming"],
    ]
    assert read["get"] == ["llama", "READY", "vllm"]
    # What each endpoint really is stays in the appliance's own fields
    raw = api_only.client().get("/v1/llm/model-endpoints/llama").json()
    assert (raw["framework"], raw["endpoint_type"], raw["spec"]["framework"]) == (
        "llamacpp",
        "sync",
        "llamacpp",
    )
    assert raw["quantize"] is None  # fp8 is no value of the client's Quantization


def test_client_update_keeps_metadata_and_labels(api_only: Appliance) -> None:
    seed(api_only)
    client(api_only, "update")  # sends source: null and metadata: {} every time
    admin = api_only.client()
    for name in ("vllm-stream", "llama"):
        got = admin.get(f"/v1/llm/model-endpoints/{name}").json()
        assert got["spec"]["deployment_state"]["max_workers"] == 2
        assert got["spec"]["metadata"] == {"owner_note": f"keep {name}"}
        assert got["spec"]["labels"] == {"team": "ml", "product": name}


def test_metadata_updates_merge_key_by_key(api_only: Appliance) -> None:
    seed(api_only)
    admin = api_only.client()
    change = {"metadata": {"added": 1, "owner_note": None}}
    assert admin.put("/v1/llm/model-endpoints/llama", json=change).status_code == 200
    got = admin.get("/v1/llm/model-endpoints/llama").json()
    assert got["spec"]["metadata"] == {"added": 1}


def set_llama(appliance: Appliance, **columns: Any) -> None:
    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        row = session.get(Endpoint, "end_llama")
        assert row is not None
        for name, value in columns.items():
            setattr(row, name, value)
        session.add(row)
    engine.dispose()


def test_client_update_resending_the_model_name_changes_nothing(api_only: Appliance) -> None:
    """A llama.cpp endpoint made from a GGUF file: `Model.update(name, model=...)` sends the
    model_name it has, which names no file; that is no change, not a 400."""
    seed(api_only)
    extra = {"model_name": "gemma-3-270m", "checkpoint_path": "gemma.gguf"}
    set_llama(api_only, extra=extra)
    admin = api_only.client()
    before = admin.get("/v1/llm/model-endpoints/llama").json()
    calls = [{"model": "gemma-3-270m"}, {"model": "gemma-3-270m", "max_workers": 1}]
    assert client(api_only, "update-llama", json.dumps(calls))["errors"] == [None, None]
    after = admin.get("/v1/llm/model-endpoints/llama").json()
    assert after["model_name"] == "gemma-3-270m"
    assert (after["spec"]["model"], after["spec"]["generation"], after["status"]) == (
        before["spec"]["model"],
        before["spec"]["generation"],
        "READY",
    )


def test_a_chat_template_must_be_a_template_on_create_update_and_apply(
    api_only: Appliance,
) -> None:
    """A bare name such as "gemma" is rendered by llama.cpp as the prompt itself: refused on
    every way in, saying what to send; "" clears a template (null leaves it)."""
    seed(api_only)
    template = "{{ messages[0].content }}"
    calls = [{"chat_template_override": "gemma"}, {"chat_template_override": template}]
    errors = client(api_only, "update-llama", json.dumps(calls))["errors"]
    assert errors[0][0] == "BadRequestError" and errors[1] is None, errors
    assert "chat_template_override 'gemma' is not a Jinja template" in errors[0][1]
    admin = api_only.client()
    assert admin.get("/v1/llm/model-endpoints/llama").json()["chat_template_override"] == template
    set_llama(api_only, status=EndpointStatus.READY)  # no builder here to finish the rollout
    calls = [{"max_workers": 1}, {"chat_template_override": ""}]
    assert client(api_only, "update-llama", json.dumps(calls))["errors"] == [None, None]
    assert admin.get("/v1/llm/model-endpoints/llama").json()["chat_template_override"] is None
    made = {"name": "tpl", "model_name": "acme/standin-1b", "gpus": 0, "chat_template": "gemma"}
    created = admin.post("/v1/llm/model-endpoints", json=made)
    assert created.status_code == 400 and "chat_template" in created.json()["detail"]
    applied = admin.post("/v1/config/apply", json={"endpoints": [made]})
    assert applied.status_code == 422, applied.text
    assert "chat_template 'gemma' is not a Jinja template" in applied.json()["detail"]


def test_the_client_raises_its_own_exceptions_for_refusals(api_only: Appliance) -> None:
    """LLM Engine's statuses, which its client maps: an invalid request or a name that exists
    is a BadRequestError (a 422 or 409 would be its UnknownError), an unknown name NotFound."""
    seed(api_only)
    errors = client(api_only, "refused")["errors"]
    assert [kind for kind, _ in errors] == [
        "BadRequestError",
        "BadRequestError",
        "BadRequestError",
        "NotFoundError",
    ], errors
    assert "already exists" in errors[0][1]
    assert "memory" in errors[1][1]
    assert "max_workers" in errors[2][1] or "min_workers" in errors[2][1]


def test_fine_tunes_fail_in_the_clients_words(api_only: Appliance) -> None:
    errors = client(api_only, "finetune")["errors"]
    assert len(errors) == 5
    for kind, message in errors:
        assert kind == "NotFoundError"
        assert "fine-tuning is not available on this appliance" in message


def test_fine_tunes_answer_in_llm_engines_shape(api_only: Appliance) -> None:
    reply = httpx.get(api_only.url + "/v1/llm/fine-tunes", headers={"x-api-key": ADMIN_KEY})
    assert reply.status_code == 404
    assert "fine-tuning is not available" in reply.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "words"),
    [
        ("POST", "/v1/docker-image-batch-jobs", "batch jobs of a Docker image are not available"),
        ("GET", "/v1/docker-image-batch-jobs/job_1", "batch jobs of a Docker image"),
        ("POST", "/v1/batch-jobs", "batch jobs of a Docker image are not available"),
        ("GET", "/v1/docker-image-batch-job-bundles/latest", "batch jobs of a Docker image"),
        ("POST", "/v1/model-bundles", "model bundles are not available"),
        ("GET", "/v2/model-bundles/latest", "model bundles are not available"),
        ("POST", "/v1/triggers", "triggers are not available"),
    ],
)
def test_llm_engine_routes_not_served_say_so_in_its_shape(
    api_only: Appliance, method: str, path: str, words: str
) -> None:
    """The rest of LLM Engine's API that one box does not serve answers as fine-tunes do: a
    404 in its `{"detail": ...}` saying it is not available and what to use instead, not
    'Invalid URL' in OpenAI's envelope."""
    reply = httpx.request(method, api_only.url + path, headers={"x-api-key": ADMIN_KEY}, json={})
    assert reply.status_code == 404
    assert words in reply.json()["detail"], reply.text


def test_model_download_serves_the_files_of_a_model_on_the_box(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    (models / "tuned" / "sub").mkdir(parents=True)
    (models / "tuned" / "config.json").write_text('{"a": 1}')
    (models / "tuned" / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "secret").write_text("not a model file")
    (models / "tuned" / "leak").symlink_to(tmp_path / "secret")
    appliance = Appliance(
        tmp_path / "appliance", redis_server, env_extra={"APPLIANCE_MODELS_DIR": str(models)}
    ).start(roles=("api",))
    try:
        seed(appliance)
        engine = open_engine(appliance.data_dir / "appliance.db")
        with session_scope(engine) as session:
            row = session.get(Endpoint, "end_llama")
            assert row is not None
            row.model = "/models/tuned"
            session.add(row)
        engine.dispose()
        urls = client(appliance, "download", "llama")["urls"]
        assert sorted(urls) == ["config.json", "sub/weights.bin"]  # the link out is left out
        admin = appliance.client()
        assert admin.get(urls["sub/weights.bin"]).content == b"\x00\x01" * 100
        assert admin.get(urls["config.json"]).json() == {"a": 1}
        head = admin.head(urls["sub/weights.bin"])  # curl -I, a download manager's first ask
        assert head.status_code == 200 and head.headers["content-length"] == "200", head
        assert head.content == b""
        base = urls["config.json"].removesuffix("config.json")
        for stray in ("leak", "..%2F..%2Fsecret", "nothing"):
            assert admin.get(base + stray).status_code == 404
        assert httpx.get(urls["config.json"]).status_code == 401  # the key is needed
        # A model its replicas fetch from Hugging Face: the client shows why not
        kind, message = client(appliance, "download", "vllm-stream")["error"]
        assert kind == "BadRequestError"
        assert "download it from there" in message
    finally:
        print(appliance.logs())
        appliance.stop()


def test_batch_completions_refuse_what_they_would_not_honour(api_only: Appliance) -> None:
    seed(api_only)
    admin = api_only.client()
    base = {
        "model_config": {"model": "llama", "num_shards": 1, "trust_remote_code": False},
        "output_data_path": "out.jsonl",
        "content": {"prompts": ["a", "b"], "max_new_tokens": 2, "temperature": 0},
    }
    for change, field in (
        ({"model_config": {"model": "llama", "seed": 3}}, "model_config.seed"),
        ({"gpus": 2}, "gpus"),
        ({"tool_config": {"name": "code_evaluator"}}, "tool_config"),
        ({"data_parallelism": 4}, "data_parallelism"),
        ({"input_data_path": "file_x"}, "content"),
        ({"content": {"prompts": ["a"], "max_new_tokens": 2}}, "content.temperature"),
        (
            {"content": {"prompts": ["a", {"b": 1}], "max_new_tokens": 2, "temperature": 0}},
            "content.prompts[1]",
        ),
    ):
        reply = admin.post("/v2/batch-completions", json={**base, **change})
        assert reply.status_code == 400, (change, reply.text)
        assert field in json.dumps(reply.json()["detail"]), (change, reply.text)
    missing = admin.post(
        "/v1/llm/batch-completions", json={**base, "model_config": {"model": "nowhere"}}
    )
    assert missing.status_code == 404
    # The client's own words for an unknown model, naming where it was named (not a prompt)
    assert missing.json()["detail"] == "model_config.model: no endpoint named 'nowhere'"
    job = admin.post("/v2/batch-completions", json=base)
    assert job.status_code == 200, job.text
    made = job.json()
    assert (made["status"], made["metadata"]["total"], made["priority"]) == ("queued", "2", "low")
    got = admin.get(f"/v2/batch-completions/{made['job_id']}").json()["job"]
    assert got["output_data_path"] == "out.jsonl"
    cancel = admin.post(f"/v2/batch-completions/{made['job_id']}/actions/cancel", json={})
    assert cancel.json() == {"success": True}
    # Cancelled before any prompt ran: nothing counts as completed or failed
    after = admin.get(f"/v2/batch-completions/{made['job_id']}").json()["job"]
    assert (after["metadata"]["completed"], after["metadata"]["failed"]) == ("0", "0")


def test_the_client_on_a_box_without_gpus_is_told_to_send_gpus_0(api_only: Appliance) -> None:
    """Model.create sends num_shards=1 unless told, and no gpus: on a box whose builder found
    no GPU the refusal names what the client sent (not a `gpus` it never set) and the way out."""
    store = redis.Redis.from_url(api_only.redis.url)
    store.set(bus.GPUS_KEY, json.dumps({"gpus": [], "message": "no GPUs"}))  # as the builder
    store.close()
    kind, message = client(api_only, "no-gpus")["error"]
    assert kind == "BadRequestError"
    assert message == (
        "num_shards 1 (LLM Engine's count of GPUs, which its client sends as 1 unless told) "
        "is more than this box has: 0 GPUs; send gpus=0 to run on the CPU"
    )
    # A body that sends neither (curl, the UI's form with GPUs left empty) hears of gpus
    plain = api_only.client().post(
        "/v1/llm/model-endpoints",
        json={"name": "plain", "model_name": "acme/standin-1b", "inference_framework": "vllm"},
    )
    assert plain.status_code == 400
    assert plain.json()["detail"] == (
        "gpus 1 is more than this box has: 0 GPUs; send gpus=0 to run on the CPU"
    )
    store = redis.Redis.from_url(api_only.redis.url)
    store.set(bus.GPUS_KEY, json.dumps({"gpus": [{"index": 0, "name": "L4"}], "message": ""}))
    store.close()
    two = api_only.client().post(
        "/v1/llm/model-endpoints",
        json={"name": "two", "model_name": "acme/standin-1b", "inference_framework": "vllm",
              "gpus": 2},
    )  # fmt: skip
    assert two.json()["detail"] == "gpus 2 is more than this box has: 1 GPU", two.text
