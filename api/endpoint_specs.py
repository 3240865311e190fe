"""Turns a create request into an endpoint row (validated, policy-checked), with the checks
an update shares (`api.endpoint_updates` applies updates through them).

Called by `api.endpoint_service` and the declared configuration's apply; a request that would
break the container policy is refused here before anything is stored.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from api import server_args
from api.schemas import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from appliance.errors import InvalidSpecError, PolicyViolationError
from appliance.ids import new_id
from appliance.keys import Caller
from appliance.models import Endpoint, EndpointStatus, Framework
from appliance.settings import Settings
from builder import frameworks, policy
from builder.specs import MODELS_MOUNT, default_image, spec_hash
from builder.weights import is_hub_id

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
# The columns a replica's container is built from (`builder.specs.container_spec`). Whether an
# edit rolls the replicas is not read from this list but from the container itself
# (`rolls`), since what a column becomes depends on the framework: `target_concurrency` is
# llama.cpp's `--parallel`, and for vLLM only the scaler's target.
CONTAINER_COLUMNS = (
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


def rolls(before: str, endpoint: Endpoint, settings: Settings) -> bool:
    """True when the edited endpoint's replicas would run another container than the one
    whose `builder.specs.spec_hash` was `before`: they must roll to a new generation."""
    return spec_hash(endpoint, settings) != before


MIN_CPUS = 0.01  # the Docker Engine's smallest CPU share
MIN_MEMORY_BYTES = 128 * 2**20  # no model server starts in less


def box_cpus() -> int:
    return os.cpu_count() or 1


def box_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _whole_mebibytes(n: int) -> int:
    return n // 2**20 * 2**20


def cpus_amount(value: str | int | float) -> float:
    """CPUs as Kubernetes writes them (2, 0.5, 500m, in ASCII digits: float() alone reads any
    script's, and underscores); ValueError for anything else."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)(m?)\s*", str(value))
    if not match:
        raise ValueError
    cpus = float(match.group(1)) / (1000 if match.group(2) else 1)
    if not math.isfinite(cpus):
        raise ValueError
    return cpus


def memory_amount(value: str | int | float) -> int:
    """Bytes of memory as Kubernetes writes it (8Gi, 512Mi, bytes); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]{1,15}(?:\.[0-9]{1,9})?)\s*([kmgtKMGT]i?)?\s*", str(value))
    if not match:
        raise ValueError
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def parse_cpus(value: str | int | float) -> float:
    """CPUs as Kubernetes writes them (2, 0.5, 500m), at least 0.01 and at most the box's."""
    cpus = cpus_amount(value)
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
    memory = memory_amount(value)
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


def quantity(kind: str, value: Any) -> Any:
    try:
        return parse_cpus(value) if kind == "cpus" else parse_memory(value)
    except ValueError:
        example = "2, 0.5 or 500m" if kind == "cpus" else "8Gi, 512Mi or a byte count"
        raise InvalidSpecError(
            f"{kind} {value!r} is not a quantity such as {example}", field=kind
        ) from None


def resolve_model(
    framework: str,
    model_name: str,
    checkpoint: str | None,
    settings: Settings,
    *,
    hidden: frozenset[str],
) -> str:
    """The model value to store; `hidden`: the models directory's entries that do not exist
    for the caller (`api.model_files.hidden_from`)."""
    if checkpoint:
        return _local_model(framework, checkpoint, settings, hidden)
    # `models/x` reads as a hub id, but vLLM loads the folder it names in the container first
    hub = is_hub_id(model_name) and policy.models_path(model_name) is None
    local = framework == Framework.LLAMACPP or not hub
    if not local or framework == Framework.CUSTOM:
        return model_name
    try:
        return _local_model(framework, model_name, settings, hidden)
    except InvalidSpecError as exc:
        if not is_hub_id(model_name) or model_name.lower().endswith(".gguf"):
            raise
        # llama.cpp takes the name as a file; one that reads as a hub id was likely meant so
        raise InvalidSpecError(
            "llama.cpp serves a GGUF file from the models directory, and a Hugging Face id "
            f"such as {model_name!r} goes with vLLM (inference_framework vllm); {exc.message}",
            field=exc.field,
        ) from None


def _local_model(framework: str, requested: str, settings: Settings, hidden: frozenset[str]) -> str:
    """A model in the models directory, of a kind its server loads: a GGUF file for llama.cpp,
    a Hugging Face directory (with config.json) for vLLM (0.32 has no GGUF loader); never the
    directory itself. Anything else would only crash-loop its replicas."""
    mounted = policy.resolve_model_path(settings.models_dir, requested, hidden=hidden)
    relative = mounted.removeprefix(MODELS_MOUNT).lstrip("/")
    path = settings.models_dir / relative
    gguf = path.is_file() and _magic(path) == b"GGUF"
    if relative in ("", "."):
        why = "is the models directory itself; name a model file or directory in it"
    elif framework == Framework.LLAMACPP and not gguf:
        why = "is not a GGUF file, which llama.cpp needs"
    elif framework == Framework.VLLM and gguf:
        why = (
            "is a GGUF file, which vLLM does not load: serve it with llama.cpp "
            "(inference_framework llamacpp), or give vLLM a Hugging Face model directory"
        )
    elif framework == Framework.VLLM and not (path / "config.json").is_file():
        why = "is not a Hugging Face model directory (with config.json), which vLLM needs"
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


# Labels and metadata are answered whole by every list and GET of the endpoint: bounded as
# stored (after an update's merge), so no team's endpoints make every listing megabytes.
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 256
MAX_METADATA_BYTES = 64 * 1024


def _check_annotations(endpoint: Endpoint) -> None:
    labels = endpoint.labels or {}
    if len(labels) > MAX_LABELS:
        raise InvalidSpecError(f"labels: at most {MAX_LABELS}, not {len(labels)}", field="labels")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY or len(value) > MAX_LABEL_VALUE:
            raise InvalidSpecError(
                f"labels: keys are at most {MAX_LABEL_KEY} characters and values "
                f"{MAX_LABEL_VALUE}; {key[:40]!r} is longer",
                field="labels",
            )
    size = len(json.dumps((endpoint.extra or {}).get("metadata") or {}))
    if size > MAX_METADATA_BYTES:
        raise InvalidSpecError(
            f"metadata: at most {MAX_METADATA_BYTES} bytes as JSON, as stored (an update's "
            f"keys merged in); this would be {size}",
            field="metadata",
        )


def check_endpoint(endpoint: Endpoint, caller: Caller, settings: Settings) -> None:
    _check_annotations(endpoint)
    if endpoint.min_replicas > endpoint.max_replicas:
        raise InvalidSpecError("min_workers must not exceed max_workers", field="min_workers")
    if endpoint.gpu_memory_fraction is not None and (
        endpoint.gpus != 1 or endpoint.framework != Framework.VLLM
    ):
        raise InvalidSpecError(
            "gpu_memory_fraction is for vLLM endpoints with gpus=1", field="gpu_memory_fraction"
        )
    _check_llamacpp_context(endpoint)
    stages = int(endpoint.args.get("pipeline_parallel_size") or 1)
    if stages > 1 and (endpoint.gpus < stages or endpoint.gpus % stages):
        raise InvalidSpecError(
            f"pipeline_parallel_size {stages} needs gpus to be a multiple of it",
            field="pipeline_parallel_size",
        )
    policy.check_env(endpoint.env)
    frameworks.check_user_env(endpoint.framework, endpoint.env, caller.is_admin)
    _check_image(endpoint, caller, settings)


def _check_llamacpp_context(endpoint: Endpoint) -> None:
    """llama.cpp's --ctx-size is max_model_len for each of its per_worker slots
    (`builder.specs.server_command`), read as a 32-bit int: past it the server cannot start."""
    slots = max(endpoint.target_concurrency, 1)
    context = int(endpoint.args.get("max_model_len") or 0) * slots
    if endpoint.framework == Framework.LLAMACPP and context > frameworks.LLAMACPP_MAX_CTX:
        raise InvalidSpecError(
            f"max_model_len {endpoint.args['max_model_len']} for each of per_worker {slots} "
            f"slots is a llama.cpp context of {context} tokens; its server takes at most "
            f"{frameworks.LLAMACPP_MAX_CTX}: lower max_model_len or per_worker",
            field="max_model_len",
        )


def new_endpoint(
    req: CreateLLMEndpointRequest, caller: Caller, settings: Settings, *, hidden: frozenset[str]
) -> Endpoint:
    """A validated endpoint row for a create request, not yet stored."""
    framework = Framework(req.inference_framework)
    gpus = req.gpus if req.gpus is not None else (req.num_shards if framework == "vllm" else 0)
    # LLM Engine's client always sends num_shards=1, so 1 beside another gpus is the default
    if framework == Framework.VLLM and req.gpus is not None and req.num_shards not in (gpus, 1):
        raise InvalidSpecError("num_shards must equal gpus", field="num_shards")
    server_args.check_fields(framework, req, settings)
    check_remote_code(req, caller)
    tag = req.inference_framework_image_tag
    endpoint = Endpoint(
        id=new_id("end"),
        name=req.name,
        owner=caller.team,
        created_by=caller.user,
        framework=framework,
        model=resolve_model(
            framework, req.model_name, req.checkpoint_path, settings, hidden=hidden
        ),
        image=req.image or server_args.image_for_tag(framework, tag, gpus, caller, settings),
        args=server_args.server_args(framework, req, name=req.name, gpus=gpus),
        env=dict(req.env or {}),
        command=req.command,
        port=req.port,
        health_route=req.healthcheck_route,
        gpus=gpus,
        gpu_memory_fraction=req.gpu_memory_fraction,
        cpus=quantity("cpus", req.cpus)
        if req.cpus is not None
        else min(DEFAULT_CPUS[framework], float(box_cpus())),
        memory_bytes=quantity("memory", req.memory)
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
        priority=priority_of(req.priority, req.high_priority, caller) or 0,
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
    check_endpoint(endpoint, caller, settings)
    policy.check_named_files(endpoint.args, settings.models_dir, hidden=hidden)
    return endpoint


def check_remote_code(
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


def priority_of(priority: int | None, high_priority: bool | None, caller: Caller) -> int | None:
    """LLM Engine's high_priority means 10, false means 0; sent beside a priority, the two must
    agree (true: above 0). A priority above 0 decides whose replicas are evicted for whose, so
    only an administrator may give one."""
    if priority is None and high_priority is not None:
        priority = HIGH_PRIORITY if high_priority else 0
    if priority is not None and priority > 0 and not caller.is_admin:
        field = "high_priority" if high_priority and priority == HIGH_PRIORITY else "priority"
        raise PolicyViolationError(
            f"{field} is for administrators: a priority above 0 lets an endpoint evict other "
            "teams' replicas; leave it out or ask an administrator",
            field=field,
        )
    if high_priority is not None and priority is not None and high_priority != (priority > 0):
        raise InvalidSpecError(
            f"high_priority: {str(high_priority).lower()} contradicts priority {priority} sent "
            f"with it (high_priority: true is priority {HIGH_PRIORITY}, false is 0): send one",
            field="high_priority",
        )
    return priority
