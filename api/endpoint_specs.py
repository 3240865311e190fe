"""Turns endpoint requests into endpoint rows (validated, policy-checked) and rows into answers.

Called by the endpoint routes; a request that would break the container policy is refused here
with a 422 before anything is stored.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from api import server_args
from api.schemas import VLLM_ARG_FIELDS, CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from appliance.errors import InvalidSpecError, PolicyViolationError
from appliance.ids import new_id
from appliance.keys import Caller
from appliance.models import Endpoint, EndpointStatus, Framework
from appliance.settings import Settings
from builder import frameworks, policy
from builder.specs import MODELS_MOUNT, default_image
from builder.weights import HUB_ID

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}
# The defaults, unless the box has less: then the box's (a sent value over it is a 422).
DEFAULT_CPUS = {Framework.VLLM: 8.0, Framework.LLAMACPP: 2.0, Framework.CUSTOM: 2.0}
DEFAULT_MEMORY = {
    Framework.VLLM: 64 * 2**30,
    Framework.LLAMACPP: 4 * 2**30,
    Framework.CUSTOM: 8 * 2**30,
}
DEFAULT_IDLE_TIMEOUT_S = 900
HIGH_PRIORITY = 10  # what LLM Engine's high_priority means on the priority scale
DEFAULT_SCALE_DOWN_WINDOW_S = 300
DEFAULT_STARTUP_TIMEOUT_S = {Framework.VLLM: 1800, Framework.LLAMACPP: 300, Framework.CUSTOM: 600}
# Changing these rolls the replicas to a new generation; other fields apply in place.
ROLLING_FIELDS = (
    "model",
    "image",
    "args",
    "env",
    "command",
    "port",
    "health_route",
    "gpus",
    "gpu_memory_fraction",
    "cpus",
    "memory_bytes",
)


MIN_CPUS = 0.01  # the Docker Engine's smallest CPU share
MIN_MEMORY_BYTES = 128 * 2**20  # no model server starts in less


def box_cpus() -> int:
    return os.cpu_count() or 1


def box_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _whole_mebibytes(n: int) -> int:
    return n // 2**20 * 2**20


def parse_cpus(value: str | int | float) -> float:
    """CPUs as Kubernetes writes them (2, 0.5, 500m), at least 0.01 and at most the box's."""
    text = str(value).strip()
    cpus = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    if not math.isfinite(cpus):
        raise ValueError
    if cpus < MIN_CPUS:
        raise InvalidSpecError(
            f"cpus {value!r} is less than the least a replica may have ({MIN_CPUS}, or 10m)",
            field="cpus",
        )
    if cpus > box_cpus():
        raise InvalidSpecError(
            f"cpus {value!r} is more than this box has ({box_cpus()} CPUs)", field="cpus"
        )
    return cpus


def parse_memory(value: str | int | float) -> int:
    """Memory as Kubernetes writes it (8Gi, 512Mi, bytes), at least 128Mi, at most the box's."""
    match = re.fullmatch(r"\s*([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*([kmgtKMGT]i?)?\s*", str(value))
    if not match:
        raise ValueError
    memory = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if memory < MIN_MEMORY_BYTES:
        raise InvalidSpecError(
            f"memory {value!r} is less than the least a replica runs in (128Mi)", field="memory"
        )
    if memory > box_memory_bytes():
        gib = box_memory_bytes() / 2**30
        raise InvalidSpecError(
            f"memory {value!r} is more than this box has ({gib:.1f}Gi)", field="memory"
        )
    return memory


def _quantity(kind: str, value: Any) -> Any:
    try:
        return parse_cpus(value) if kind == "cpus" else parse_memory(value)
    except ValueError:
        example = "2, 0.5 or 500m" if kind == "cpus" else "8Gi, 512Mi or a byte count"
        raise InvalidSpecError(
            f"{kind} {value!r} is not a quantity such as {example}", field=kind
        ) from None


def _model(framework: str, model_name: str, checkpoint: str | None, settings: Settings) -> str:
    if checkpoint:
        return _local_model(framework, checkpoint, settings)
    local = framework == Framework.LLAMACPP or not HUB_ID.match(model_name)
    if local and framework != Framework.CUSTOM:
        return _local_model(framework, model_name, settings)
    return model_name


def _local_model(framework: str, requested: str, settings: Settings) -> str:
    """A model in the models directory, of a kind its server loads: a GGUF file for llama.cpp,
    a Hugging Face directory (with config.json) or a GGUF file for vLLM; never the directory
    itself. Anything else would only crash-loop its replicas."""
    mounted = policy.resolve_model_path(settings.models_dir, requested)
    relative = mounted.removeprefix(MODELS_MOUNT).lstrip("/")
    path = settings.models_dir / relative
    gguf = path.is_file() and _magic(path) == b"GGUF"
    if relative in ("", "."):
        why = "is the models directory itself; name a model file or directory in it"
    elif framework == Framework.LLAMACPP and not gguf:
        why = "is not a GGUF file, which llama.cpp needs"
    elif framework == Framework.VLLM and not gguf and not (path / "config.json").is_file():
        why = "is neither a Hugging Face model directory (with config.json) nor a GGUF file"
    else:
        return mounted
    raise InvalidSpecError(f"model {requested!r} {why}", field="checkpoint_path")


def _magic(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            return file.read(4)
    except OSError:
        return b""


def _check_image(endpoint: Endpoint, caller: Caller, settings: Settings) -> None:
    if endpoint.framework == Framework.CUSTOM or endpoint.image:
        if not caller.is_admin:
            raise PolicyViolationError(
                "only an administrator may run custom images or override images", field="image"
            )
        if endpoint.framework == Framework.CUSTOM and not endpoint.image:
            raise InvalidSpecError("a custom endpoint needs `image`", field="image")
        if endpoint.framework == Framework.CUSTOM and not endpoint.command:
            raise InvalidSpecError("a custom endpoint needs `command`", field="command")
    defaults = {
        settings.vllm_image,
        settings.vllm_cpu_image,
        settings.llamacpp_image,
        settings.llamacpp_cuda_image,
    }
    policy.check_image(
        default_image(endpoint, settings),
        default_images=defaults,
        approved=settings.approved_images,
    )


def _validate(endpoint: Endpoint, caller: Caller, settings: Settings) -> None:
    if endpoint.min_replicas > endpoint.max_replicas:
        raise InvalidSpecError("min_workers must not exceed max_workers", field="min_workers")
    if endpoint.gpu_memory_fraction is not None and (
        endpoint.gpus != 1 or endpoint.framework != Framework.VLLM
    ):
        raise InvalidSpecError(
            "gpu_memory_fraction is for vLLM endpoints with gpus=1", field="gpu_memory_fraction"
        )
    stages = int(endpoint.args.get("pipeline_parallel_size") or 1)
    if stages > 1 and (endpoint.gpus < stages or endpoint.gpus % stages):
        raise InvalidSpecError(
            f"pipeline_parallel_size {stages} needs gpus to be a multiple of it",
            field="pipeline_parallel_size",
        )
    policy.check_env(endpoint.env)
    frameworks.check_user_env(endpoint.framework, endpoint.env, caller.is_admin)
    _check_image(endpoint, caller, settings)


def new_endpoint(req: CreateLLMEndpointRequest, caller: Caller, settings: Settings) -> Endpoint:
    """A validated endpoint row for a create request, not yet stored."""
    framework = Framework(req.inference_framework)
    gpus = req.gpus if req.gpus is not None else (req.num_shards if framework == "vllm" else 0)
    # LLM Engine's client always sends num_shards=1, so 1 beside another gpus is the default
    if framework == Framework.VLLM and req.gpus is not None and req.num_shards not in (gpus, 1):
        raise InvalidSpecError("num_shards must equal gpus", field="num_shards")
    server_args.check_fields(framework, req, settings)
    _check_remote_code(req, caller)
    tag = req.inference_framework_image_tag
    endpoint = Endpoint(
        id=new_id("end"),
        name=req.name,
        owner=caller.team,
        created_by=caller.user,
        framework=framework,
        model=_model(framework, req.model_name, req.checkpoint_path, settings),
        image=req.image or server_args.image_for_tag(framework, tag, gpus, caller, settings),
        args=server_args.server_args(framework, req, name=req.name, gpus=gpus),
        env=dict(req.env or {}),
        command=req.command,
        port=req.port,
        health_route=req.healthcheck_route,
        gpus=gpus,
        gpu_memory_fraction=req.gpu_memory_fraction,
        cpus=_quantity("cpus", req.cpus)
        if req.cpus is not None
        else min(DEFAULT_CPUS[framework], float(box_cpus())),
        memory_bytes=_quantity("memory", req.memory)
        if req.memory is not None
        else min(DEFAULT_MEMORY[framework], _whole_mebibytes(box_memory_bytes())),
        min_replicas=req.min_workers,
        max_replicas=req.max_workers,
        target_concurrency=req.per_worker,
        endpoint_type=req.endpoint_type,
        idle_timeout_s=req.idle_timeout_seconds
        if req.idle_timeout_seconds is not None
        else DEFAULT_IDLE_TIMEOUT_S,
        startup_timeout_s=req.startup_timeout_seconds or DEFAULT_STARTUP_TIMEOUT_S[framework],
        scale_down_window_s=req.scale_down_window_seconds
        if req.scale_down_window_seconds is not None
        else DEFAULT_SCALE_DOWN_WINDOW_S,
        priority=_priority(req.priority, req.high_priority, caller) or 0,
        public_inference=bool(req.public_inference),
        labels=req.labels,
        extra={
            "model_name": req.model_name,
            "metadata": req.metadata,
            "image_tag": req.inference_framework_image_tag,
            "quantize": req.quantize,
            "checkpoint_path": req.checkpoint_path,
            "post_inference_hooks": req.post_inference_hooks,
            "default_callback_url": req.default_callback_url,
            "default_callback_auth": req.default_callback_auth,
            "timeout_seconds": req.timeout_seconds,
            "forwarder_max_concurrency": req.forwarder_max_concurrency,
        },
        status=EndpointStatus.UPDATE_PENDING,
        desired_replicas=max(req.min_workers, 1) if req.max_workers else 0,
    )
    _validate(endpoint, caller, settings)
    return endpoint


def _check_remote_code(
    req: CreateLLMEndpointRequest | UpdateLLMEndpointRequest, caller: Caller
) -> None:
    """vLLM's `trust_remote_code` runs the model repository's own Python in the replica: like a
    custom image, an administrator's to allow."""
    if req.trust_remote_code and not caller.is_admin:
        raise PolicyViolationError(
            "trust_remote_code is for administrators: it runs the model repository's own code "
            "in the replica; ask one to create or change this endpoint",
            field="trust_remote_code",
        )


def _priority(priority: int | None, high_priority: bool | None, caller: Caller) -> int | None:
    """`priority` wins; LLM Engine's high_priority means 10, false means 0. A priority above 0
    decides whose replicas are evicted for whose, so only an administrator may give one."""
    if priority is None and high_priority is not None:
        priority = HIGH_PRIORITY if high_priority else 0
    if priority is not None and priority > 0 and not caller.is_admin:
        field = "high_priority" if high_priority and priority == HIGH_PRIORITY else "priority"
        raise PolicyViolationError(
            f"{field} is for administrators: a priority above 0 lets an endpoint evict other "
            "teams' replicas; leave it out or ask an administrator",
            field=field,
        )
    return priority


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


def apply_update(
    endpoint: Endpoint, req: UpdateLLMEndpointRequest, caller: Caller, settings: Settings
) -> bool:
    """Apply an update to the row in place; True when replicas must roll to a new generation."""
    before = {name: getattr(endpoint, name) for name in ROLLING_FIELDS}
    sent = _sent(endpoint, req)
    server_args.check_fields(endpoint.framework, req, settings)
    _check_remote_code(req, caller)
    if "model_name" in sent or "checkpoint_path" in sent:
        name = req.model_name or str(endpoint.extra.get("model_name"))
        endpoint.model = _model(endpoint.framework, name, req.checkpoint_path, settings)
        endpoint.extra = {**endpoint.extra, "model_name": name}
    _update_columns(endpoint, req, sent, caller)
    if sent & {*VLLM_ARG_FIELDS, "chat_template_override", "extra_flags", "quantize"}:
        fresh = server_args.server_args(
            endpoint.framework, req, name=endpoint.name, gpus=endpoint.gpus
        )
        endpoint.args = {**endpoint.args, **fresh}
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
    _validate(endpoint, caller, settings)
    endpoint.desired_replicas = max(
        endpoint.min_replicas, min(endpoint.desired_replicas, endpoint.max_replicas)
    )
    return bool(req.force_bundle_recreation) or any(
        getattr(endpoint, name) != value for name, value in before.items()
    )


def merged(extra: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """The stored metadata with `change` applied key by key (null removes a key)."""
    metadata = {**(extra.get("metadata") or {}), **change}
    return {key: value for key, value in metadata.items() if value is not None}


# What LLM Engine's client sends on every update unless told otherwise: vLLM's own defaults
CLIENT_DEFAULTS: dict[str, Any] = {"trust_remote_code": False, "force_bundle_recreation": False}


def _sent(endpoint: Endpoint, req: UpdateLLMEndpointRequest) -> set[str]:
    """The fields an update means to change. LLM Engine's client sends every field it has:
    null for those not given (null is "leave it", but for NULLABLE_EXTRA), and CLIENT_DEFAULTS,
    which change nothing while the endpoint has that value (a llama.cpp endpoint, which has no
    such setting, is not refused for them)."""
    for name, default in CLIENT_DEFAULTS.items():
        if getattr(req, name) == default and endpoint.args.get(name, default) == default:
            setattr(req, name, None)
    return {f for f in req.model_fields_set if getattr(req, f) is not None or f in NULLABLE_EXTRA}


NULLABLE_EXTRA = ("timeout_seconds", "forwarder_max_concurrency")  # null: back to the default


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
    priority = _priority(req.priority, req.high_priority, caller)
    if priority is not None:
        endpoint.priority = priority
    if req.cpus is not None:
        endpoint.cpus = _quantity("cpus", req.cpus)
    if req.memory is not None:
        endpoint.memory_bytes = _quantity("memory", req.memory)
