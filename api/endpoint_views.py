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
# How the GET shows a callback's secrets: LLM Engine's client needs a string there, and a PUT
# that sends the GET's value back changes nothing (`api.endpoint_updates`).
HIDDEN = "********"
CALLBACK_SECRETS = ("password", "key")


# Async queue settings LLM Engine's GETs carry; tasks here neither expire in the queue nor
# time out there (docs/fields.md, "Refused"), so both are null.
NOT_ON_ONE_BOX: dict[str, Any] = {
    "task_expires_seconds": None,
    "queue_message_timeout_seconds": None,
}


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).isoformat()


def memory_quantity(n: int) -> str | int:
    """Bytes as Kubernetes writes them, as LLM Engine's resource_state holds what was sent:
    7Gi, 512Mi, 8G; a byte count when no unit divides it."""
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("G", 10**9), ("M", 10**6)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return n


def cpus_quantity(cpus: float) -> int | float:
    """CPUs as a number, whole ones as an integer (2, not 2.0)."""
    return int(cpus) if float(cpus).is_integer() else cpus


def callback_auth_public(auth: dict[str, Any] | None) -> dict[str, Any] | None:
    """The default callback's auth with its password or key hidden: the GET shows which kind
    and user, never the secret."""
    if not auth:
        return None
    return {k: HIDDEN if k in CALLBACK_SECRETS and v is not None else v for k, v in auth.items()}


def model_endpoint_public(
    endpoint: Endpoint,
    replicas: Sequence[Replica],
    progress: dict[str, Any] | None = None,
    queued: int | None = None,
) -> dict[str, Any]:
    """LLM Engine's GetModelEndpointV1Response for the endpoint, plus `progress`: what its
    replicas wait on (an image pull or a download; `builder/prepare.Progress`), or None.
    `queued`: its async tasks waiting for a worker (`num_queued_items`). The fields with no
    counterpart on one box (`aws_role`, `task_expires_seconds`, ...) are there, null."""
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
        "default_callback_auth": callback_auth_public(endpoint.extra.get("default_callback_auth")),
        "labels": endpoint.labels,
        "aws_role": None,
        "results_s3_bucket": None,
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
            "cpus": cpus_quantity(endpoint.cpus),
            "gpus": endpoint.gpus,
            "memory": memory_quantity(endpoint.memory_bytes),
            "gpu_type": None,
            "storage": None,
            "nodes_per_worker": 1,
            "optimize_costs": None,
            "gpu_memory_fraction": endpoint.gpu_memory_fraction,
        },
        "num_queued_items": queued,
        "public_inference": endpoint.public_inference,
        **NOT_ON_ONE_BOX,
        "generation": endpoint.generation,
        "framework": endpoint.framework,
        "model": endpoint.model,
    }


def llm_endpoint_public(
    endpoint: Endpoint,
    replicas: Sequence[Replica],
    progress: dict[str, Any] | None = None,
    queued: int | None = None,
) -> dict[str, Any]:
    """LLM Engine's GetLLMModelEndpointV1Response for the endpoint, in the words of LLM
    Engine's client: the fields it parses into enums (`inference_framework`,
    `spec.endpoint_type`, `quantize`) hold only values its enums know (CLIENT_*), so one
    llama.cpp, custom or async endpoint cannot break `Model.list()` for everybody. The
    appliance's own `framework` and `endpoint_type` say what the endpoint really is."""
    spec = model_endpoint_public(endpoint, replicas, progress, queued)
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
        **NOT_ON_ONE_BOX,
        "spec": spec,
        "progress": progress,
        "framework": endpoint.framework,
        "endpoint_type": endpoint.endpoint_type,
    }
