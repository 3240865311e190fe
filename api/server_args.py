"""The server settings of an endpoint request, checked against its framework and turned into
the row's `args` and image: every setting is honoured (it becomes a flag, an image or a column)
or refused with an InvalidSpecError that names it and says why.

Called by `api.endpoint_specs` on create (the declared configuration's apply too) and by
`api.endpoint_updates` on update; the flag tables themselves live in
`builder.frameworks`, and docs/fields.md lists every field and what it becomes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from api.schemas import VLLM_ARG_FIELDS, CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from appliance.errors import InvalidSpecError, PolicyViolationError
from appliance.keys import Caller
from appliance.models import Framework
from appliance.settings import Settings
from builder import frameworks, policy
from forwarder.worker.callbacks import CallbackRefusedError, check_auth, check_url

Request = CreateLLMEndpointRequest | UpdateLLMEndpointRequest

# LLM Engine fields with no counterpart on one box: a value other than "unset" is refused.
NOT_ON_ONE_BOX = {
    "storage": "replicas share the box's disk; the appliance does not reserve storage",
    "optimize_costs": "there is no node pool to optimise on one box",
    "billing_tags": "the appliance has no billing",
    "enable_startup_metrics": "startup metrics are LLM Engine's tracing; see the endpoint's "
    "events instead",
    "task_expires_seconds": "async tasks wait until a replica runs them; delete what you no "
    "longer need",
    "queue_message_timeout_seconds": "a running task is re-queued when its worker stops "
    "(APPLIANCE_TASK_LEASE_S), not after a fixed timeout",
    "prewarm": "a new endpoint is always kept warm for its idle timeout",
}
POST_INFERENCE_HOOKS = ("callback",)
# A chat template is a Jinja template: llama.cpp (run with --jinja) renders any other text as
# the prompt itself (a model name such as "gemma" answers every chat alike), and vLLM 0.32
# fails to start on text that is neither a template nor a file. vLLM also reads a path.
JINJA = re.compile(r"\{\{|\{%")
TEMPLATE_FILE = re.compile(r"[^\s{}]+\.jinja")
CLEARED = ""  # a setting an update sends to drop it: the server's default (the model's template)
# LLM Engine's GPU types, by a word of the name NVML reports for such a GPU.
GPU_TYPES = {
    "nvidia-tesla-t4": r"\bT4\b",
    "nvidia-ampere-a10": r"\bA10G?\b",
    "nvidia-ampere-a100": r"\bA100\b",
    "nvidia-ampere-a100e": r"\bA100\b",
    "nvidia-hopper-h100": r"\bH100\b",
    "nvidia-hopper-h100-1g20gb": r"\bH100\b",
    "nvidia-hopper-h100-3g40gb": r"\bH100\b",
}


def _sent_settings(req: Request) -> dict[str, Any]:
    return {k: getattr(req, k) for k in VLLM_ARG_FIELDS if getattr(req, k) is not None}


def vllm_args(req: Request, *, name: str, gpus: int) -> dict[str, Any]:
    """The vLLM flags' settings; LLM Engine's names mapped to vLLM 0.32's."""
    args = _sent_settings(req)
    frameworks.check_args(Framework.VLLM, args)
    served = args.pop("served_model_name", None)
    if served is not None and served not in (name, [name]):
        raise InvalidSpecError(
            "served_model_name is always the endpoint's name (the OpenAI `model`); leave it out",
            field="served_model_name",
        )
    parallel = args.pop("tensor_parallel_size", None)
    stages = int(args.get("pipeline_parallel_size") or 1)
    if parallel is not None and parallel != max(gpus // stages, 1):
        raise InvalidSpecError(
            "tensor_parallel_size follows gpus (divided by pipeline_parallel_size); set gpus",
            field="tensor_parallel_size",
        )
    if "disable_log_requests" in args:  # vLLM 0.32 logs requests only when asked to
        args["enable_log_requests"] = not args.pop("disable_log_requests")
    if req.quantize is not None:
        if args.get("quantization", req.quantize) != req.quantize:
            raise InvalidSpecError(
                "quantize and quantization disagree; set one of them", field="quantize"
            )
        args["quantization"] = req.quantize
    _chat_template(req, args, Framework.VLLM)
    if req.extra_flags:
        policy.check_extra_flags(req.extra_flags)
        args["extra_flags"] = dict(req.extra_flags)
    return args


def request_fields(args: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields that give these stored server args again: the inverse of the renames
    above (`chat_template` is sent as `chat_template_override`, vLLM's `enable_log_requests` as
    LLM Engine's `disable_log_requests`). `/v1/config` exports and the update's "sent back as
    it is" check both read it."""
    fields: dict[str, Any] = {}
    for name, value in args.items():
        if name == "enable_log_requests":
            fields["disable_log_requests"] = not value
        else:
            fields["chat_template_override" if name == "chat_template" else name] = value
    return fields


def llamacpp_args(req: Request) -> dict[str, Any]:
    """llama.cpp's settings: context size, seed and chat template; the rest is refused."""
    args = _sent_settings(req)
    frameworks.check_args(Framework.LLAMACPP, args)
    if req.quantize is not None:
        raise InvalidSpecError(
            "quantize is refused: a GGUF file carries its own quantization", field="quantize"
        )
    if req.extra_flags:
        raise InvalidSpecError("extra_flags are for vLLM endpoints", field="extra_flags")
    _chat_template(req, args, Framework.LLAMACPP)
    return args


def custom_args(req: Request) -> dict[str, Any]:
    """A custom image runs its own command: no server settings at all."""
    frameworks.check_args(Framework.CUSTOM, _sent_settings(req))
    for name in ("quantize", "extra_flags", "chat_template_override"):
        if getattr(req, name):
            raise InvalidSpecError(
                f"{name} is refused: a custom endpoint runs its own `command`", field=name
            )
    return {}


def _chat_template(req: Request, args: dict[str, Any], framework: str) -> None:
    """`chat_template` (or LLM Engine's `chat_template_override`): a Jinja template, or for
    vLLM the path of a `.jinja` file in the image; "" clears it (`CLEARED`)."""
    if req.chat_template_override is not None:
        if args.get("chat_template", req.chat_template_override) != req.chat_template_override:
            raise InvalidSpecError(
                "chat_template and chat_template_override disagree; set one of them",
                field="chat_template_override",
            )
        args["chat_template"] = req.chat_template_override
    template = args.get("chat_template")
    if template is None or template == CLEARED or JINJA.search(template):
        return
    if framework == Framework.VLLM and TEMPLATE_FILE.fullmatch(template):
        return
    name = "chat_template" if req.chat_template is not None else "chat_template_override"
    shown = template if len(template) <= 60 else template[:59] + "…"
    file = ", or the path of a .jinja file in the image" if framework == Framework.VLLM else ""
    raise InvalidSpecError(
        f"{name} {shown!r} is not a Jinja template: send the template itself (with "
        f"{{{{ ... }}}} / {{% ... %}}){file}, or leave it out to use the model's own",
        field=name,
    )


def server_args(
    framework: str,
    req: Request,
    *,
    name: str,
    gpus: int,
    current: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The row's `args`: the request's settings over `current` (the endpoint's own, on an
    update); a setting of "" is dropped (`CLEARED`), so the server uses its own default again
    (a chat_template: the model's own template), where `--flag ''` would stop it starting."""
    if framework == Framework.VLLM:
        fresh = vllm_args(req, name=name, gpus=gpus)
    elif framework == Framework.LLAMACPP:
        fresh = llamacpp_args(req)
    else:
        fresh = custom_args(req)
    args = {**(current or {}), **fresh}
    return {name: value for name, value in args.items() if value != CLEARED}


def check_fields(framework: str, req: Request, settings: Settings) -> None:
    """422 for the request fields that mean nothing for this framework or on one box, and for
    a default callback URL or credentials that callbacks would refuse."""
    if framework != Framework.CUSTOM:
        for name in ("command", "port", "healthcheck_route"):
            if getattr(req, name) is not None:
                raise InvalidSpecError(
                    f"{name} is refused: a {framework} endpoint runs the {framework} server with "
                    "the command, port and health route the appliance builds from its settings",
                    field=name,
                )
    for name, why in NOT_ON_ONE_BOX.items():
        if getattr(req, name) is not None:
            raise InvalidSpecError(f"{name} is refused: {why}; leave it out", field=name)
    for hook in req.post_inference_hooks or ():
        if hook not in POST_INFERENCE_HOOKS:
            raise InvalidSpecError(
                f"post_inference_hooks: {hook!r} is refused; the appliance has only the "
                "`callback` hook (default_callback_url, or a task's callback_url)",
                field="post_inference_hooks",
            )
    if req.default_callback_url is not None:
        try:
            check_url(str(req.default_callback_url), settings.callback_allowed_hosts)
        except CallbackRefusedError as exc:
            message = exc.message.replace("callback_url", "the URL")
            raise InvalidSpecError(
                f"default_callback_url is refused: {message}", field="default_callback_url"
            ) from None
    check_auth(req.default_callback_auth, "default_callback_auth")
    if framework != Framework.VLLM and (req.num_shards or 0) > 1:
        raise InvalidSpecError(
            f"num_shards is vLLM's tensor parallelism; a {framework} endpoint uses `gpus`",
            field="num_shards",
        )


def check_gpu_type(
    gpu_type: str | None, gpus: int, gpu_names: list[str] | None, sent_as: str = "gpus"
) -> None:
    """A gpu_type is honoured when the box has GPUs of that type: 422 when it has none. Asks
    for more GPUs than the box has (as the builder last reported them) are a 422 too, not an
    endpoint waiting for GPUs forever, naming the field the count came in (`sent_as`:
    `num_shards` when a create sent no `gpus`)."""
    if gpu_names is not None and gpus > len(gpu_names):
        told = ""
        if sent_as == "num_shards":
            told = " (LLM Engine's count of GPUs, which its client sends as 1 unless told)"
        way = "; send gpus=0 to run on the CPU" if not gpu_names else ""
        raise InvalidSpecError(
            f"{sent_as} {gpus}{told} is more than this box has: {len(gpu_names)} "
            f"GPU{'' if len(gpu_names) == 1 else 's'}{way}",
            field=sent_as,
        )
    if gpu_type is None:
        return
    if gpu_type not in GPU_TYPES:
        raise InvalidSpecError(
            f"gpu_type {gpu_type!r} is not one of {', '.join(GPU_TYPES)}", field="gpu_type"
        )
    if not gpus:
        raise InvalidSpecError("gpu_type needs gpus of at least 1", field="gpu_type")
    if gpu_names is None:
        raise InvalidSpecError(
            "gpu_type cannot be checked yet: the builder has not reported the GPUs; retry",
            field="gpu_type",
        )
    if not any(re.search(GPU_TYPES[gpu_type], name) for name in gpu_names):
        found = ", ".join(sorted(set(gpu_names))) or "no GPU"
        raise InvalidSpecError(
            f"gpu_type {gpu_type!r} is refused: this box has {found}", field="gpu_type"
        )


def tagged_image(framework: str, tag: str | None, gpus: int, settings: Settings) -> str | None:
    """The image an `inference_framework_image_tag` names: the framework's default image
    repository at that tag (None: the default image itself)."""
    if not tag or tag == "latest" or framework == Framework.CUSTOM:
        return None
    if framework == Framework.VLLM:
        default = settings.vllm_image if gpus else settings.vllm_cpu_image
    else:
        default = settings.llamacpp_cuda_image if gpus else settings.llamacpp_image
    repository, _, last = default.rpartition("/")
    name = last.split(":", 1)[0]
    image = f"{repository}/{name}:{tag}" if repository else f"{name}:{tag}"
    return None if image == default else image


def image_for_tag(
    framework: str, tag: str | None, gpus: int, caller: Caller, settings: Settings
) -> str | None:
    """`tagged_image`, checked: another tag is another image, so it needs an administrator
    and an approved image, as any image override does; a custom endpoint names its `image`."""
    if tag and tag != "latest" and framework == Framework.CUSTOM:
        raise InvalidSpecError(
            "inference_framework_image_tag is refused: a custom endpoint names its `image`",
            field="inference_framework_image_tag",
        )
    image = tagged_image(framework, tag, gpus, settings)
    if image is None:
        return None
    if not caller.is_admin:
        raise PolicyViolationError(
            f"inference_framework_image_tag {tag!r} means the image {image!r}; only an "
            "administrator may run an image other than the default",
            field="inference_framework_image_tag",
        )
    return image
