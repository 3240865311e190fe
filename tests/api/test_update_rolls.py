"""An update rolls an endpoint's replicas to a new generation exactly when it changes the
container they would run (api/endpoint_updates.py, api/endpoint_specs.rolls): every update
field, changed alone, on a llama.cpp and on a vLLM endpoint. `per_worker` on llama.cpp is
`--parallel` and once changed only the row, leaving the replica on its old slot count."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from api import declared_apply, endpoint_updates
from api.schemas import UpdateLLMEndpointRequest
from appliance.errors import ApplianceError
from appliance.models import Endpoint
from builder.specs import LABEL_SPEC_HASH, ContainerSpec, container_spec
from tests.builder.field_cases import ADMIN, build, settings

LLAMA = {"inference_framework": "llamacpp", "checkpoint_path": "gemma.gguf", "gpus": 0}
VLLM = {"model_name": "acme/model-1b", "gpus": 1}
TEMPLATE = "{{ messages[0].content }}"

# One change per field the endpoint's framework takes, each alone (a dict: with what it needs).
COMMON: dict[str, Any] = {
    "cpus": "1500m",
    "memory": "6Gi",
    "env": {"OMP_NUM_THREADS": "2"},
    "gpus": 1,
    "min_workers": 1,
    "max_workers": 3,
    "per_worker": 3,
    "labels": {"team": "ml"},
    "metadata": {"note": "x"},
    "public_inference": True,
    "priority": 5,
    "high_priority": True,
    "idle_timeout_seconds": 60,
    "scale_down_window_seconds": 60,
    "startup_timeout_seconds": 60,
    "timeout_seconds": 30,
    "forwarder_max_concurrency": 2,
    "default_callback_url": "http://localhost:9/done",
    "default_callback_auth": {"kind": "basic", "username": "u", "password": "p"},
    "post_inference_hooks": ["callback"],
    "nodes_per_worker": 1,
    "gpu_type": "nvidia-hopper-h100",
    "source": "hugging_face",
    "force_bundle_recreation": False,
    "max_model_len": 2048,
    "seed": 7,
    "chat_template": TEMPLATE,
    "chat_template_override": TEMPLATE,
}
LLAMA_CHANGES = {**COMMON, "checkpoint_path": "other.gguf", "model_name": "other.gguf"}
VLLM_CHANGES = {
    **COMMON,
    "env": {"VLLM_LOGGING_LEVEL": "DEBUG"},
    "model_name": "acme/model-2b",
    "inference_framework_image_tag": "v0.32.1",
    "image": "vllm/vllm-openai:v0.32.1",
    "num_shards": 2,
    "tensor_parallel_size": 1,
    "served_model_name": "ep",
    "pipeline_parallel_size": {"pipeline_parallel_size": 2, "gpus": 2},
    "gpu_memory_fraction": 0.5,
    "quantize": "awq",
    "quantization": "awq",
    "extra_flags": {"--max-logprobs": 5},
    "gpu_memory_utilization": 0.8,
    "dtype": "bfloat16",
    "enforce_eager": True,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 4096,
    "trust_remote_code": True,
    "enable_prefix_caching": True,
    "revision": "v2",
    "code_revision": "v2",
    "tokenizer": "acme/tokenizer",
    "tokenizer_mode": "slow",
    "tokenizer_revision": "v2",
    "skip_tokenizer_init": True,
    "config_format": "hf",
    "load_format": "safetensors",
    "tool_call_parser": "hermes",
    "enable_auto_tool_choice": True,
    "cache_dtype": "fp8",
    "block_size": 32,
    "num_gpu_blocks_override": 100,
    "attention_backend": "FLASH_ATTN",
    "disable_sliding_window": True,
    "limit_mm_per_prompt": {"image": 2},
    "mm_processor_kwargs": {"num_crops": 4},
    "disable_log_requests": True,
}
# Refused on every endpoint (docs/fields.md, "Refused"), or only a custom endpoint's.
NOT_UPDATED = {
    "billing_tags",
    "storage",
    "optimize_costs",
    "prewarm",
    "enable_startup_metrics",
    "task_expires_seconds",
    "queue_message_timeout_seconds",
    "swap_space",
    "max_seq_len_to_capture",
    "quantization_param_path",
    "override_neuron_config",
    "rope_scaling",
    "max_gpu_memory_utilization",
    "command",
    "port",
    "healthcheck_route",
    "endpoint_type",  # sent back as it is, or refused
}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    for name in ("gemma.gguf", "other.gguf"):
        (models_dir / name).write_bytes(b"GGUF")
    return models_dir


def container(endpoint: Endpoint, models: Path) -> ContainerSpec:
    """One replica's container as the builder would create it, less the digest label."""
    made = container_spec(
        endpoint,
        settings=settings(models),
        install_id="i1",
        replica_id="r1",
        gpu_ids=tuple(range(endpoint.gpus)),
        gpu_fraction=endpoint.gpu_memory_fraction or 1.0,
    )
    labels = {k: v for k, v in made.labels.items() if k != LABEL_SPEC_HASH}
    return replace(made, labels=labels)


def update(endpoint: Endpoint, models: Path, **fields: Any) -> bool:
    request = UpdateLLMEndpointRequest.model_validate(fields)
    return endpoint_updates.apply_update(
        endpoint, request, ADMIN, settings(models), hidden=frozenset()
    )


def test_every_update_field_is_tried() -> None:
    tried = set(LLAMA_CHANGES) | set(VLLM_CHANGES) | NOT_UPDATED
    assert tried == set(UpdateLLMEndpointRequest.model_fields)


@pytest.mark.parametrize(
    ("base", "field", "value"),
    [("llamacpp", name, value) for name, value in LLAMA_CHANGES.items()]
    + [("vllm", name, value) for name, value in VLLM_CHANGES.items()],
)
def test_an_update_rolls_exactly_when_the_container_changes(
    base: str, field: str, value: Any, models: Path
) -> None:
    endpoint = build(models, LLAMA if base == "llamacpp" else VLLM)
    before = container(endpoint, models)
    fields = value if isinstance(value, dict) and field in value else {field: value}
    try:
        rolls = update(endpoint, models, **fields)
    except ApplianceError as refused:
        pytest.fail(f"{field}={value!r} refused: {refused}")
    assert rolls == (container(endpoint, models) != before)


def test_per_worker_rolls_a_llamacpp_endpoint_only(models: Path) -> None:
    """llama.cpp serves `per_worker` slots (`--parallel`); for vLLM it is the scaler's target."""
    llama = build(models, {**LLAMA, "per_worker": 4})
    assert update(llama, models, per_worker=3)
    assert "--parallel" in container(llama, models).command
    command = list(container(llama, models).command)
    assert command[command.index("--parallel") + 1] == "3"
    vllm = build(models, {**VLLM, "per_worker": 4})
    assert not update(vllm, models, per_worker=3)
    assert vllm.target_concurrency == 3


def test_a_declared_per_worker_change_rolls_a_llamacpp_endpoint(models: Path) -> None:
    """The declared configuration's apply decides the same way (api/declared_apply.py)."""
    endpoint = build(models, {**LLAMA, "per_worker": 4})
    desired = build(models, {**LLAMA, "per_worker": 3})
    assert declared_apply._replace_spec(endpoint, desired, settings(models))
    assert endpoint.target_concurrency == 3
    assert not declared_apply._replace_spec(endpoint, desired, settings(models))
