"""Applies an update request to an endpoint row in place, with the checks a create makes
(`api.endpoint_specs`), and says whether its replicas must roll. Called by
`api.endpoint_service.update_endpoint` (the update routes and the UI's edit form).

A field left out or sent as null is unchanged, and so is a field sent with the value the
endpoint already has: it is no change and never refused. LLM Engine's client sends back what it
is given (`Model.update("gemma", model="gemma-3-270m")` sends the current `model_name`), and a
GET's values sent back by a PUT change nothing, whoever may no longer set them.
"""

from __future__ import annotations

from typing import Any

from api import endpoint_specs, endpoint_views, server_args
from api.endpoint_specs import HIGH_PRIORITY
from api.schemas import VLLM_ARG_FIELDS, UpdateLLMEndpointRequest
from appliance.errors import InvalidSpecError, PolicyViolationError
from appliance.keys import Caller
from appliance.models import Endpoint, Framework
from appliance.settings import Settings
from builder import policy
from builder.specs import is_local_model, spec_hash

SIMPLE_COLUMNS = {  # update field -> endpoint column, copied as sent
    "env": "env",
    "command": "command",
    "port": "port",
    "gpus": "gpus",
    "healthcheck_route": "health_route",
    "gpu_memory_fraction": "gpu_memory_fraction",
    "min_workers": "min_replicas",
    "max_workers": "max_replicas",
    "per_worker": "target_concurrency",
    "public_inference": "public_inference",
    "labels": "labels",
    "image": "image",
    "idle_timeout_seconds": "idle_timeout_s",
    "scale_down_window_seconds": "scale_down_window_s",
    "startup_timeout_seconds": "startup_timeout_s",
}
EXTRA_FIELDS = (  # update fields kept in `extra`, shown back and read by other parts
    "timeout_seconds",
    "forwarder_max_concurrency",
    "default_callback_url",
    "default_callback_auth",
    "post_inference_hooks",
    "quantize",
)
NULLABLE_EXTRA = ("timeout_seconds", "forwarder_max_concurrency")  # null: back to the default
MODEL_FIELDS = ("model_name", "checkpoint_path")  # one model: both unchanged, or both sent


def apply_update(
    endpoint: Endpoint,
    req: UpdateLLMEndpointRequest,
    caller: Caller,
    settings: Settings,
    *,
    hidden: frozenset[str],
) -> bool:
    """Apply an update to the row in place; True when replicas must roll to a new generation:
    when the container they would run is another (`endpoint_specs.rolls`), or when asked.
    `hidden`: the model files that do not exist for the caller (another team's uploads)."""
    before = spec_hash(endpoint, settings)
    sent = _sent(endpoint, req)
    if "endpoint_type" in sent:
        raise InvalidSpecError(
            f"endpoint_type cannot be changed: this endpoint is {endpoint.endpoint_type!r}; "
            f"create another endpoint for {req.endpoint_type!r}",
            field="endpoint_type",
        )
    server_args.check_fields(endpoint.framework, req, settings)
    endpoint_specs.check_remote_code(req, caller)
    if sent & set(MODEL_FIELDS):
        _update_model(endpoint, req, settings, hidden)
    _update_columns(endpoint, req, sent, caller)
    if sent & {*VLLM_ARG_FIELDS, "chat_template_override", "extra_flags", "quantize"}:
        endpoint.args = server_args.server_args(
            endpoint.framework, req, name=endpoint.name, gpus=endpoint.gpus, current=endpoint.args
        )
        policy.check_named_files(endpoint.args, settings.models_dir, hidden=hidden)
    if req.metadata:
        endpoint.extra = {**endpoint.extra, "metadata": merged(endpoint.extra, req.metadata)}
    for name in EXTRA_FIELDS:
        if name in sent and (getattr(req, name) is not None or name in NULLABLE_EXTRA):
            endpoint.extra = {**endpoint.extra, name: getattr(req, name)}
    if req.inference_framework_image_tag is not None:
        tag = req.inference_framework_image_tag
        endpoint.image = server_args.image_for_tag(
            endpoint.framework, tag, endpoint.gpus, caller, settings
        )
        endpoint.extra = {**endpoint.extra, "image_tag": tag}
    if "image" in sent and req.image is not None and not caller.is_admin:
        raise PolicyViolationError("only an administrator may override images", field="image")
    endpoint_specs.check_endpoint(endpoint, caller, settings)
    endpoint.desired_replicas = max(
        endpoint.min_replicas, min(endpoint.desired_replicas, endpoint.max_replicas)
    )
    return bool(req.force_bundle_recreation) or endpoint_specs.rolls(before, endpoint, settings)


def merged(extra: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """The stored metadata with `change` applied key by key (null removes a key)."""
    metadata = {**(extra.get("metadata") or {}), **change}
    return {key: value for key, value in metadata.items() if value is not None}


def _sent(endpoint: Endpoint, req: UpdateLLMEndpointRequest) -> set[str]:
    """The fields an update means to change. LLM Engine's client sends every field it has:
    null for those not given (null is "leave it", but for NULLABLE_EXTRA), and its defaults
    (`trust_remote_code: false`), which change nothing while the endpoint has that value (a
    llama.cpp endpoint, which has no such setting, is not refused for them). The fields sent
    with the value they have are set to null here, so nothing below checks or applies them."""
    unchanged = _unchanged(endpoint, req)
    for name in unchanged:
        setattr(req, name, None)
    return {
        f
        for f in req.model_fields_set - unchanged
        if getattr(req, f) is not None or f in NULLABLE_EXTRA
    }


def _unchanged(endpoint: Endpoint, req: UpdateLLMEndpointRequest) -> set[str]:
    """The sent fields whose value is the endpoint's now (as create stored it, or as its GET
    shows it)."""
    now = _current(endpoint, req)
    same = {
        name
        for name in req.model_fields_set
        if name in now and getattr(req, name) is not None and _same(name, getattr(req, name), now)
    }
    sent_models = {name for name in MODEL_FIELDS if getattr(req, name) is not None}
    if not sent_models <= same:  # a new model_name or checkpoint_path: the pair decides
        same -= set(MODEL_FIELDS)
    if req.num_shards is not None and "num_shards" not in same:
        same.discard("gpus")  # a gpus sent as it is still holds a new num_shards to itself
    return same


def _same(name: str, value: Any, now: dict[str, Any]) -> bool:
    if name in ("cpus", "memory"):
        amount = endpoint_specs.cpus_amount if name == "cpus" else endpoint_specs.memory_amount
        try:
            return bool(amount(value) == now[name])
        except ValueError:
            return False
    if name in ("checkpoint_path", "served_model_name"):
        return value in now[name]
    if name == "default_callback_auth":  # as stored, or as the GET shows it (secrets hidden)
        return value in (now[name], endpoint_views.callback_auth_public(now[name]))
    return bool(value == now[name])


def _current(endpoint: Endpoint, req: UpdateLLMEndpointRequest) -> dict[str, Any]:
    """Each update field's value now, for the fields an update could otherwise refuse or
    change when sent back as they are. Those that follow `gpus` are taken at the `gpus` this
    update leaves, so `num_shards` beside a new `gpus` is still checked against it."""
    extra, args = endpoint.extra, endpoint.args
    gpus = req.gpus if req.gpus is not None else endpoint.gpus
    stages = int(req.pipeline_parallel_size or args.get("pipeline_parallel_size") or 1)
    local = endpoint.model if is_local_model(endpoint.model) else None  # as its GET shows it
    now: dict[str, Any] = {
        **{name: None for name in (*VLLM_ARG_FIELDS, "chat_template_override", "extra_flags")},
        **server_args.request_fields(args),
        **{name: getattr(endpoint, column) for name, column in SIMPLE_COLUMNS.items()},
        **{name: extra.get(name) for name in EXTRA_FIELDS},
        "model_name": extra.get("model_name") or endpoint.model,
        "checkpoint_path": (extra.get("checkpoint_path"), local),
        "inference_framework_image_tag": extra.get("image_tag") or "latest",
        "num_shards": gpus,
        "tensor_parallel_size": max(gpus // stages, 1),
        "served_model_name": (endpoint.name, [endpoint.name]),
        "trust_remote_code": args.get("trust_remote_code", False),
        "priority": endpoint.priority,
        "high_priority": {0: False, HIGH_PRIORITY: True}.get(endpoint.priority),
        "cpus": endpoint.cpus,
        "memory": endpoint.memory_bytes,
        "force_bundle_recreation": False,
        "source": "hugging_face",
        "endpoint_type": endpoint.endpoint_type,
    }
    return now


def _update_model(
    endpoint: Endpoint, req: UpdateLLMEndpointRequest, settings: Settings, hidden: frozenset[str]
) -> None:
    """A new model_name or checkpoint_path: the checkpoint_path sent names the weights, else
    model_name does (as on create), and `extra` keeps both as the GET shows them."""
    extra = endpoint.extra
    name = req.model_name or extra.get("model_name") or endpoint.model
    checkpoint = req.checkpoint_path or None
    endpoint.model = endpoint_specs.resolve_model(
        endpoint.framework, name, checkpoint, settings, hidden=hidden
    )
    endpoint.extra = {**extra, "model_name": name, "checkpoint_path": checkpoint}


def _update_columns(
    endpoint: Endpoint, req: UpdateLLMEndpointRequest, sent: set[str], caller: Caller
) -> None:
    for field_name, column in SIMPLE_COLUMNS.items():
        if field_name in sent and getattr(req, field_name) is not None:
            setattr(endpoint, column, getattr(req, field_name))
    if req.num_shards is not None and endpoint.framework == Framework.VLLM:
        if req.gpus is not None and req.gpus != req.num_shards:
            raise InvalidSpecError("num_shards must equal gpus", field="num_shards")
        endpoint.gpus = req.num_shards
    priority = endpoint_specs.priority_of(req.priority, req.high_priority, caller)
    if priority is not None:
        endpoint.priority = priority
    if req.cpus is not None:
        endpoint.cpus = endpoint_specs.quantity("cpus", req.cpus)
    if req.memory is not None:
        endpoint.memory_bytes = endpoint_specs.quantity("memory", req.memory)
