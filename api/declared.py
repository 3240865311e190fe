"""The declared configuration, exported: every endpoint as the create request that makes it
again, and, for administrators, every active key's name, team, user, scopes and limits (never
its text); and every endpoint as LLM Engine's create request, for a move to a cluster.
`GET /v1/config` answers with these; `api/declared_apply.py` makes an install match them.
"""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from api import server_args
from api.schemas import VLLM_ARG_FIELDS
from api.times import iso
from appliance import queries
from appliance.keys import Caller
from appliance.models import ApiKey, Endpoint, EndpointStatus, Framework
from appliance.settings import Settings
from builder.specs import is_local_model

VERSION = 1
LIMITS = (
    "requests_per_minute",
    "max_concurrent_requests",
    "max_queued_tasks",
    "max_tokens_per_request",
)
# extra's keys that are request fields of the same name, exported when set
EXTRA_FIELDS = (
    "checkpoint_path",
    "quantize",
    "post_inference_hooks",
    "default_callback_url",
    "timeout_seconds",
    "forwarder_max_concurrency",
)
LLM_ENGINE_QUANTIZE = ("awq", "bitsandbytes")
# handled by name below, or meaningless in LLM Engine's request (it sets them itself)
LLM_ENGINE_SKIPPED_ARGS = ("chat_template", "extra_flags", "tensor_parallel_size")


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def memory_text(n: int) -> str:
    """Bytes as a quantity LLM Engine and this API both read: 4Gi, 512Mi or a byte count."""
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def endpoint_request(endpoint: Endpoint, settings: Settings) -> dict[str, Any]:
    """The create request (`CreateLLMEndpointRequest`) that makes this endpoint's spec again:
    the inverse of `endpoint_specs.new_endpoint`."""
    extra = endpoint.extra
    body: dict[str, Any] = {
        "name": endpoint.name,
        "model_name": extra.get("model_name") or endpoint.model,
        "inference_framework": endpoint.framework,
        "endpoint_type": endpoint.endpoint_type,
        "gpus": endpoint.gpus,
        "cpus": _number(endpoint.cpus),
        "memory": memory_text(endpoint.memory_bytes),
        "min_workers": endpoint.min_replicas,
        "max_workers": endpoint.max_replicas,
        "per_worker": endpoint.target_concurrency,
        "public_inference": endpoint.public_inference,
        "idle_timeout_seconds": endpoint.idle_timeout_s,
        "scale_down_window_seconds": endpoint.scale_down_window_s,
        "startup_timeout_seconds": endpoint.startup_timeout_s,
        "priority": endpoint.priority,
        "labels": dict(endpoint.labels),
        "metadata": extra.get("metadata") or {},
    }
    tag = extra.get("image_tag")
    derived = server_args.tagged_image(endpoint.framework, tag, endpoint.gpus, settings)
    optional = {
        **{name: extra.get(name) for name in EXTRA_FIELDS},
        "inference_framework_image_tag": tag if tag and tag != "latest" else None,
        "image": endpoint.image if endpoint.image != derived else None,
        "env": dict(endpoint.env) or None,
        "command": endpoint.command,
        "port": endpoint.port,
        "healthcheck_route": endpoint.health_route,
        "gpu_memory_fraction": endpoint.gpu_memory_fraction,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    body.update(server_args.request_fields(endpoint.args))
    return body


def key_entry(row: ApiKey) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": row.name,
        "team": row.owner,
        "user": row.user,
        "scopes": sorted(row.scopes),
        "admin": row.is_admin,
    }
    if row.expires_at is not None:
        entry["expires_at"] = iso(int(row.expires_at))
    limits = {name: getattr(row, name) for name in LIMITS if getattr(row, name) is not None}
    if limits:
        entry["limits"] = limits
    return entry


def managed_endpoints(caller: Caller, session: Session) -> list[Endpoint]:
    """The endpoints a caller's document speaks for: its team's, or every one for an admin."""
    query = select(Endpoint).where(col(Endpoint.status) != EndpointStatus.DELETE_IN_PROGRESS)
    query = queries.of_team(query, col(Endpoint.owner), caller)
    return list(session.exec(query.order_by(col(Endpoint.name))).all())


def active_keys(session: Session, now: float) -> list[ApiKey]:
    query = select(ApiKey).where(col(ApiKey.revoked_at).is_(None))
    rows = session.exec(query.order_by(col(ApiKey.owner), col(ApiKey.user), col(ApiKey.name)))
    return [r for r in rows.all() if r.expires_at is None or r.expires_at > now]


def export(caller: Caller, session: Session, settings: Settings, now: float) -> dict[str, Any]:
    """The document `appliance export` writes and `appliance apply` reads."""
    document: dict[str, Any] = {
        "version": VERSION,
        "endpoints": [
            {"team": e.owner, **endpoint_request(e, settings)}
            for e in managed_endpoints(caller, session)
        ],
    }
    if caller.is_admin:
        document["keys"] = list(declared_keys(active_keys(session, now)).values())
    return document


def key_identity(row: ApiKey) -> tuple[str, str, str]:
    """What names a key in the document: its team, user and name."""
    return (row.owner, row.user, row.name)


def declared_keys(rows: list[ApiKey]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """The entry of each active key's identity, the first of its rows (`active_keys` order):
    a rotated key (a new one made before the old is revoked) is one entry, as `apply` matches
    it, so an export always applies back."""
    entries: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in rows:
        entries.setdefault(key_identity(row), key_entry(row))
    return entries


def llm_engine_request(endpoint: Endpoint) -> tuple[dict[str, Any], list[str]]:
    """LLM Engine's CreateLLMModelEndpointV1Request for the endpoint, and notes on what does
    not carry over as it is."""
    notes: list[str] = []
    extra = endpoint.extra
    gpus = endpoint.gpus
    if gpus == 0:
        gpus = 1
        notes.append("runs on CPU here; LLM Engine serves vLLM on GPUs: gpus set to 1")
    if is_local_model(endpoint.model) or extra.get("checkpoint_path"):
        notes.append(
            f"model files do not carry over ({endpoint.model}): upload the weights to object "
            "storage and set checkpoint_path (s3://, gs:// or azure://)"
        )
    if endpoint.endpoint_type != "streaming":
        notes.append(f"was {endpoint.endpoint_type}; LLM Engine's LLM endpoints are streaming")
    notes.append("set gpu_type and storage for your cluster, or drop cpus, gpus and memory")
    labels = {"team": endpoint.owner, "product": endpoint.name, **endpoint.labels}
    request: dict[str, Any] = {
        "name": endpoint.name,
        "model_name": extra.get("model_name") or endpoint.model,
        "source": "hugging_face",
        "inference_framework": "vllm",
        "inference_framework_image_tag": extra.get("image_tag") or "latest",
        "num_shards": gpus,
        "endpoint_type": "streaming",
        "cpus": _number(endpoint.cpus),
        "gpus": gpus,
        "memory": memory_text(endpoint.memory_bytes),
        "min_workers": endpoint.min_replicas,
        "max_workers": endpoint.max_replicas,
        "per_worker": endpoint.target_concurrency,
        "labels": labels,
        "metadata": extra.get("metadata") or {},
        "public_inference": endpoint.public_inference,
        "high_priority": endpoint.priority > 0,
    }
    request.update(_llm_engine_options(endpoint))
    return request, notes


def _llm_engine_options(endpoint: Endpoint) -> dict[str, Any]:
    extra, args = endpoint.extra, endpoint.args
    options: dict[str, Any] = {}
    if args.get("chat_template"):
        options["chat_template_override"] = args["chat_template"]
    if extra.get("quantize") in LLM_ENGINE_QUANTIZE:
        options["quantize"] = extra["quantize"]
    if extra.get("post_inference_hooks"):
        options["post_inference_hooks"] = extra["post_inference_hooks"]
    url = extra.get("default_callback_url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        options["default_callback_url"] = url
    for name, value in args.items():
        if name in VLLM_ARG_FIELDS and name not in LLM_ENGINE_SKIPPED_ARGS:
            options[name] = value
    return options


# Why an endpoint of a framework LLM Engine's create request cannot name is left out of the
# export rather than written as a vLLM request it is not (another server, model and hardware).
LLM_ENGINE_CANNOT = {
    Framework.LLAMACPP: "a llama.cpp endpoint: LLM Engine's create request has no llama.cpp "
    "framework (vllm, sglang, deepspeed, text_generation_inference, lightllm, tensorrt_llm), "
    "and its model ({model}) is a GGUF file vLLM would serve otherwise. Convert the model to "
    "safetensors and create a vllm endpoint for it by hand",
    Framework.CUSTOM: "a custom image: on LLM Engine it is a model bundle (runnable_image) and "
    "a /v1/model-endpoints endpoint, not an LLM endpoint; create those by hand",
}


def llm_engine_export(
    caller: Caller, session: Session
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """LLM Engine's create request for each endpoint it can express, with notes; and the
    endpoints it cannot, each with the reason (`skipped`)."""
    out, skipped = [], []
    for endpoint in managed_endpoints(caller, session):
        cannot = LLM_ENGINE_CANNOT.get(Framework(endpoint.framework))
        if cannot is not None:
            reason = cannot.format(model=endpoint.model)
            skipped.append({"name": endpoint.name, "team": endpoint.owner, "reason": reason})
            continue
        request, notes = llm_engine_request(endpoint)
        out.append({"request": request, "notes": notes})
    return out, skipped
