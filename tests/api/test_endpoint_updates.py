"""An update sends only what it means to change: a field sent with the value the endpoint
already has is no change and never refused (api/endpoint_updates.py), while a changed value
beside it is checked as before. LLM Engine's client sends back what it was given, and a GET's
values sent back by a PUT must change nothing, whoever may no longer set them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api import declared, endpoint_changes, endpoint_service, endpoint_updates
from api.schemas import UpdateLLMEndpointRequest
from appliance.errors import InvalidSpecError, OperationInProgressError
from appliance.keys import Caller
from appliance.models import Endpoint, EndpointStatus
from tests.builder.field_cases import ADMIN, USER, build, settings

LLAMA = {
    "inference_framework": "llamacpp",
    "model_name": "gemma-3-270m",  # a label: the checkpoint names the weights
    "checkpoint_path": "gemma.gguf",
    "gpus": 0,
}
VLLM = {
    "model_name": "acme/model-1b",
    "gpus": 2,
    "pipeline_parallel_size": 2,
    "cpus": "500m",
    "memory": "3Gi",
    "inference_framework_image_tag": "v0.32.1",
    "high_priority": True,
    "trust_remote_code": True,
    "env": {"VLLM_PLUGINS": "x"},
    "max_model_len": 2048,
    "disable_log_requests": True,
    "quantize": "awq",
    "chat_template": "{{ messages[0].content }}",
    "extra_flags": {"--max-logprobs": 5},
    "default_callback_url": "http://localhost:9/done",
    "post_inference_hooks": ["callback"],
    "timeout_seconds": 30,
    "labels": {"team": "ml"},
    "metadata": {"note": "keep"},
}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "gemma.gguf").write_bytes(b"GGUF")
    (models_dir / "other.gguf").write_bytes(b"GGUF")
    return models_dir


def update(endpoint: Endpoint, models: Path, caller: Caller = ADMIN, **fields: Any) -> bool:
    request = UpdateLLMEndpointRequest.model_validate(fields)
    return endpoint_updates.apply_update(
        endpoint, request, caller, settings(models), hidden=frozenset()
    )


def test_resending_the_model_name_of_a_gguf_endpoint_changes_nothing(models: Path) -> None:
    """`Model.update("gemma", model="gemma-3-270m")` sends the endpoint's own model_name; it
    was resolved as a model file and refused ("model file 'gemma-3-270m' does not exist")."""
    endpoint = build(models, LLAMA)
    before = endpoint_changes.spec(endpoint)
    assert not update(endpoint, models, model_name="gemma-3-270m", max_workers=1)
    assert endpoint_changes.spec(endpoint) == before
    assert update(endpoint, models, checkpoint_path="other.gguf")
    assert endpoint.model == "/models/other.gguf"
    assert endpoint.extra["checkpoint_path"] == "other.gguf"
    assert not update(endpoint, models, checkpoint_path="/models/other.gguf")  # as a GET shows it
    with pytest.raises(InvalidSpecError) as refused:  # a new model_name alone names the model
        update(endpoint, models, model_name="gemma-3-270m-it")
    assert "gemma-3-270m-it" in refused.value.message
    assert update(endpoint, models, model_name="gemma.gguf")
    assert (endpoint.model, endpoint.extra["checkpoint_path"]) == ("/models/gemma.gguf", None)


def sent_back(endpoint: Endpoint, models: Path) -> dict[str, Any]:
    """Every field of the endpoint as the declared configuration exports it and as LLM
    Engine's GET shows it, less what only a create takes."""
    body = declared.endpoint_request(endpoint, settings(models))
    for create_only in ("name", "inference_framework", "endpoint_type"):
        body.pop(create_only)
    return {
        **body,
        "num_shards": endpoint.gpus,
        "served_model_name": endpoint.name,
        "tensor_parallel_size": 1,
        "disable_log_requests": True,
        "quantize": "awq",
        "chat_template": endpoint.args["chat_template"],
        "inference_framework_image_tag": "v0.32.1",
        "cpus": endpoint.cpus,
        "memory": endpoint.memory_bytes,
        "high_priority": True,
        "force_bundle_recreation": False,
        "source": "hugging_face",
    }


def test_every_field_sent_back_as_it_is_changes_nothing(models: Path) -> None:
    endpoint = build(models, VLLM)
    before = endpoint_changes.spec(endpoint)
    assert not update(endpoint, models, **sent_back(endpoint, models))
    assert endpoint_changes.spec(endpoint) == before
    llama = build(models, {**LLAMA, "gpus": 2, "max_model_len": 1024})
    before = endpoint_changes.spec(llama)
    assert not update(llama, models, num_shards=2, tensor_parallel_size=2, trust_remote_code=False)
    assert endpoint_changes.spec(llama) == before


def test_a_user_may_send_back_what_only_an_administrator_may_set(models: Path) -> None:
    endpoint = build(models, {"high_priority": True, "trust_remote_code": True})
    update(
        endpoint,
        models,
        USER,
        priority=10,
        high_priority=True,
        trust_remote_code=True,
        inference_framework_image_tag="latest",
        max_workers=2,
    )
    assert endpoint.max_replicas == 2 and endpoint.priority == 10
    for change in ({"priority": 20}, {"high_priority": False, "priority": 11}):
        with pytest.raises(InvalidSpecError) as refused:
            update(endpoint, models, USER, **change)
        assert refused.value.field == "priority"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"gpus": 4, "num_shards": 2}, "num_shards"),  # 2 was the endpoint's, but not gpus 4's
        ({"gpus": 2, "num_shards": 4}, "num_shards"),  # gpus 2 sent as it is: num_shards won
        ({"gpus": 4, "tensor_parallel_size": 2}, "tensor_parallel_size"),
        ({"gpus": 2, "chat_template": "gemma"}, "chat_template"),
        ({"served_model_name": "other"}, "served_model_name"),
    ],
)
def test_a_changed_value_is_checked_beside_unchanged_ones(
    fields: dict[str, Any], named: str, models: Path
) -> None:
    endpoint = build(models, {"gpus": 2})
    with pytest.raises(InvalidSpecError) as refused:
        update(endpoint, models, **fields)
    assert refused.value.field == named


def test_model_name_and_checkpoint_path_are_one_model(models: Path) -> None:
    """A checkpoint_path sent as it is beside a new model_name is sent: it still names the
    weights, not model_name."""
    endpoint = build(models, {**LLAMA, "model_name": "gemma.gguf", "checkpoint_path": None})
    assert endpoint.model == "/models/gemma.gguf"
    update(endpoint, models, model_name="other.gguf", checkpoint_path="/models/gemma.gguf")
    assert endpoint.model == "/models/gemma.gguf"
    assert endpoint.extra["model_name"] == "other.gguf"


def test_an_endpoint_type_sent_back_changes_nothing_and_another_is_refused(models: Path) -> None:
    """A GET's `endpoint_type` sent back by a PUT was refused ("Extra inputs are not
    permitted"); the same type is no change, another says it cannot be changed."""
    endpoint = build(models, LLAMA)
    assert not update(endpoint, models, endpoint_type="streaming", max_workers=1)
    with pytest.raises(InvalidSpecError) as refused:
        update(endpoint, models, endpoint_type="async")
    assert refused.value.field == "endpoint_type"
    assert "cannot be changed" in refused.value.message
    assert endpoint.endpoint_type == "streaming"


def test_high_priority_beside_a_priority_that_is_not_high_is_refused(models: Path) -> None:
    """high_priority: true with priority -5 made a priority of -5, saying nothing."""
    fields = {"high_priority": True, "priority": -5}
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {**LLAMA, **fields})
    assert refused.value.field == "high_priority"
    endpoint = build(models, LLAMA)
    with pytest.raises(InvalidSpecError) as refused:
        update(endpoint, models, **fields)
    assert refused.value.field == "high_priority"
    assert endpoint.priority == 0


@pytest.mark.parametrize(
    "reason",
    [
        "waiting for GPUs: needs 2 GPUs, 1 is free",
        "waiting for memory: needs all of the box's 21.2 GiB (its limit is 23.5 GiB), 13.2 GiB "
        "are free; set the endpoint's `memory` to what it needs to start beside other replicas",
    ],
)
def test_a_deploy_waiting_for_room_may_be_changed(reason: str) -> None:
    """A deploy whose replica waits for GPUs or memory may wait forever, and its status_reason
    says to change the endpoint: the change is taken, where it was a 409 for memory."""
    for status in (EndpointStatus.UPDATE_PENDING, EndpointStatus.UPDATE_IN_PROGRESS):
        waiting = Endpoint(id="end_w", name="w", owner="t1", status=status, status_reason=reason)
        endpoint_service.check_not_busy(waiting)
    starting = Endpoint(
        id="end_s",
        name="s",
        owner="t1",
        status=EndpointStatus.UPDATE_IN_PROGRESS,
        status_reason="starting 1 replica (5 s): loading",
    )
    with pytest.raises(OperationInProgressError):
        endpoint_service.check_not_busy(starting)
