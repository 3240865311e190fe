"""Endpoint rows as the endpoint routes answer them: LLM Engine's GetModelEndpointV1Response
and GetLLMModelEndpointV1Response, plus the appliance's own fields. Called by the routes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from appliance.models import Endpoint, Replica, ReplicaState
from builder.specs import is_local_model

# What LLM Engine's client (scale-llm-engine) can parse: its LLMInferenceFramework knows vLLM
# (and frameworks the appliance lacks), its ModelEndpointType only `streaming`, its
# Quantization two methods. llama.cpp and custom endpoints serve the OpenAI API the appliance
# relays LLM Engine's calls to, as vLLM does, so the client is told `vllm`.
CLIENT_FRAMEWORKS = ("vllm",)
CLIENT_FRAMEWORK = "vllm"
CLIENT_ENDPOINT_TYPE = "streaming"
CLIENT_QUANTIZE = ("bitsandbytes", "awq")


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat()


def model_endpoint_public(
    endpoint: Endpoint, replicas: Sequence[Replica], progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """LLM Engine's GetModelEndpointV1Response for the endpoint, plus `progress`: what its
    replicas wait on (an image pull or a download; `builder/prepare.Progress`), or None."""
    ready = sum(r.state == ReplicaState.READY for r in replicas)
    live = sum(r.state != ReplicaState.FAILED for r in replicas)
    return {
        "id": endpoint.id,
        "name": endpoint.name,
        "endpoint_type": endpoint.endpoint_type,
        "destination": f"appliance:{endpoint.id}",
        "deployment_name": endpoint.name,
        "metadata": endpoint.extra.get("metadata") or {},
        "bundle_name": endpoint.name,
        "status": endpoint.status,
        "status_reason": endpoint.status_reason,
        "progress": progress,
        "post_inference_hooks": endpoint.extra.get("post_inference_hooks"),
        "default_callback_url": endpoint.extra.get("default_callback_url"),
        "labels": endpoint.labels,
        "created_by": endpoint.created_by,
        "created_at": _iso(endpoint.created_at),
        "last_updated_at": _iso(endpoint.updated_at),
        "deployment_state": {
            "min_workers": endpoint.min_replicas,
            "max_workers": endpoint.max_replicas,
            "per_worker": endpoint.target_concurrency,
            "concurrent_requests_per_worker": endpoint.target_concurrency,
            "forwarder_max_concurrency": endpoint.extra.get("forwarder_max_concurrency"),
            "available_workers": ready,
            "unavailable_workers": live - ready,
            "desired_workers": endpoint.desired_replicas,
            "idle_timeout_seconds": endpoint.idle_timeout_s,
            "scale_down_window_seconds": endpoint.scale_down_window_s,
            "last_request_at": endpoint.last_request_at,
        },
        "resource_state": {
            "cpus": endpoint.cpus,
            "gpus": endpoint.gpus,
            "memory": endpoint.memory_bytes,
            "gpu_type": None,
            "storage": None,
            "nodes_per_worker": 1,
            "gpu_memory_fraction": endpoint.gpu_memory_fraction,
        },
        "public_inference": endpoint.public_inference,
        "generation": endpoint.generation,
        "framework": endpoint.framework,
        "model": endpoint.model,
    }


def llm_endpoint_public(
    endpoint: Endpoint, replicas: Sequence[Replica], progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """LLM Engine's GetLLMModelEndpointV1Response for the endpoint, in the words of LLM
    Engine's client: the fields it parses into enums (`inference_framework`,
    `spec.endpoint_type`, `quantize`) hold only values its enums know (CLIENT_*), so one
    llama.cpp, custom or async endpoint cannot break `Model.list()` for everybody. The
    appliance's own `framework` and `endpoint_type` say what the endpoint really is."""
    spec = model_endpoint_public(endpoint, replicas, progress)
    spec["endpoint_type"] = CLIENT_ENDPOINT_TYPE
    quantize = endpoint.extra.get("quantize")
    return {
        "id": endpoint.id,
        "name": endpoint.name,
        "model_name": endpoint.extra.get("model_name") or endpoint.model,
        "source": "hugging_face",
        "status": endpoint.status,
        "status_reason": endpoint.status_reason,
        "inference_framework": endpoint.framework
        if endpoint.framework in CLIENT_FRAMEWORKS
        else CLIENT_FRAMEWORK,
        "inference_framework_image_tag": endpoint.extra.get("image_tag") or "latest",
        "num_shards": endpoint.gpus,
        "quantize": quantize if quantize in CLIENT_QUANTIZE else None,
        "checkpoint_path": endpoint.model if is_local_model(endpoint.model) else None,
        "chat_template_override": endpoint.args.get("chat_template"),
        "spec": spec,
        "progress": progress,
        "framework": endpoint.framework,
        "endpoint_type": endpoint.endpoint_type,
    }
