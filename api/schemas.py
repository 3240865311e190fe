"""Request and response bodies of the endpoint routes, in LLM Engine's shapes plus our fields."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from api.body import Body

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
NAME_RULE = (
    "use lowercase letters, digits and dashes, starting and ending with a letter or digit "
    "(a name is the OpenAI model and part of container names)"
)


def _endpoint_name(name: str) -> str:
    """An endpoint's name, refused in words rather than as the pattern it must match."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"{name!r} is not a usable name: {NAME_RULE}")
    return name


Quantity = str | int | float

# Every number a request carries is bounded (and so within SQLite's integer range); NaN and
# infinity are refused by the models' `allow_inf_nan=False`.
MAX_GPUS = 64  # more than any one box holds; the box's own count is checked on create/update
MAX_WORKERS = 64
MAX_COUNT = 100_000  # requests per replica, sequences, swap GiB
MAX_TOKENS = 1 << 26  # context lengths and token budgets
MAX_SEED = 2**32 - 1  # llama.cpp's seed is 32 bits
MAX_BLOCK_SIZE = 1024
MAX_SECONDS = 30 * 86400  # timeouts and windows: a month at most
MAX_PRIORITY = 1000


def _carried(value: str) -> str:
    """A string that reaches a container (its environment, its command line) is a C string
    there: the runtime refuses a NUL in one only when the replica starts (runc: "environment
    variable value can't contain null"), and a command-line argument ends at it."""
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000), which a container cannot carry")
    return value


# Every string a request can send to a container: env names and values, the command, the
# server's settings, templates, model names.
Carried = Annotated[str, AfterValidator(_carried)]
# Each setting becomes one argument of the server's command line: Linux takes 128 KiB at most
# for one, and a replica whose command line is refused only crash-loops.
Short = Annotated[Carried, Field(max_length=1024)]
Template = Annotated[Carried, Field(max_length=64 * 1024)]


def _no_parent(value: str) -> str:
    """A revision names a folder in the Hugging Face cache (`refs/<revision>`): never a way
    out of it."""
    if ".." in value.split("/") or value.startswith("/"):
        raise ValueError("must be a branch, tag or commit, without '..'")
    return value


# A branch, tag or commit of a hub repository: `revision` of a download ahead of time and of
# an endpoint (`code_revision`, `tokenizer_revision` too)
Revision = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"^[\w.\-/]+$"),
    AfterValidator(_no_parent),
]
BOUNDED = ConfigDict(extra="forbid", allow_inf_nan=False)


LONE_SURROGATE = "holds a lone surrogate (\\ud800-\\udfff), which is no character; send UTF-8"
MAX_DEPTH = 32  # nesting of a free-form value: far past any real use, far below JSON's limits


def storable(value: Any, max_depth: int | None = MAX_DEPTH) -> Any:
    """`value` when it can be stored and answered as JSON again: no number anywhere in it is
    NaN or infinite, no text (a value or a key) holds a lone surrogate (JSON's `"\\ud800"`,
    which no UTF-8 reply carries), and nothing in it is nested more than MAX_DEPTH deep.
    Free-form fields (`metadata`, vLLM's dict settings) are stored as sent, and a reply's
    serialiser stops at 255 levels: past any of these, every later GET and list of the endpoint
    would fail."""
    pending: list[tuple[str, Any, int]] = [("", value, 0)]
    while pending:
        where, item, depth = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where or 'the body'}: NaN and infinity are refused; send a number")
        if isinstance(item, str) and not _unicode(item):
            raise ValueError(f"{where or 'the body'}: {LONE_SURROGATE}")
        if not isinstance(item, dict | list | tuple):
            continue
        if max_depth is not None and depth > max_depth:
            raise ValueError(f"{where}: nested more than {max_depth} levels deep; flatten it")
        if isinstance(item, dict):
            for key in item:  # the keys first: a path names them
                if isinstance(key, str) and not _unicode(key):
                    raise ValueError(f"{where or 'the body'}: {LONE_SURROGATE}")
            pending.extend(
                (f"{where}.{k}" if where else str(k), v, depth + 1) for k, v in item.items()
            )
        else:
            pending.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(item))
    return value


def _unicode(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _Storable(Body):
    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        return storable(data)


class Answerable(Body):
    """A body whose free-form JSON goes on to a replica as sent (a task's `args`): no NaN,
    infinity or lone surrogate anywhere in it (`storable`, at any depth), which no replica reads
    as JSON and no reply carries; stored, a task's page could not be shown."""

    @model_validator(mode="before")
    @classmethod
    def _answerable(cls, data: Any) -> Any:
        return storable(data, max_depth=None)


# vLLM settings LLM Engine's client flattens into its create request; each becomes a flag.
VLLM_ARG_FIELDS = (
    "max_model_len",
    "max_num_seqs",
    "enforce_eager",
    "trust_remote_code",
    "pipeline_parallel_size",
    "tensor_parallel_size",
    "quantization",
    "disable_log_requests",
    "chat_template",
    "tool_call_parser",
    "enable_auto_tool_choice",
    "load_format",
    "config_format",
    "tokenizer_mode",
    "limit_mm_per_prompt",
    "max_num_batched_tokens",
    "tokenizer",
    "dtype",
    "seed",
    "revision",
    "code_revision",
    "rope_scaling",
    "tokenizer_revision",
    "quantization_param_path",
    "max_seq_len_to_capture",
    "disable_sliding_window",
    "skip_tokenizer_init",
    "served_model_name",
    "override_neuron_config",
    "mm_processor_kwargs",
    "block_size",
    "gpu_memory_utilization",
    "swap_space",
    "cache_dtype",
    "num_gpu_blocks_override",
    "enable_prefix_caching",
    "max_gpu_memory_utilization",
    "attention_backend",
)


class _VllmArgs(Body):
    max_model_len: int | None = Field(None, gt=0, le=MAX_TOKENS)
    max_num_seqs: int | None = Field(None, gt=0, le=MAX_COUNT)
    enforce_eager: bool | None = None
    trust_remote_code: bool | None = None
    pipeline_parallel_size: int | None = Field(None, gt=0, le=MAX_GPUS)
    tensor_parallel_size: int | None = Field(None, gt=0, le=MAX_GPUS)
    quantization: Short | None = None
    disable_log_requests: bool | None = None
    chat_template: Template | None = None
    tool_call_parser: Short | None = None
    enable_auto_tool_choice: bool | None = None
    load_format: Short | None = None
    config_format: Short | None = None
    tokenizer_mode: Short | None = None
    limit_mm_per_prompt: dict[str, Any] | None = None  # vLLM reads it as a JSON object
    max_num_batched_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    tokenizer: Short | None = None
    dtype: Short | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    revision: Revision | None = None
    code_revision: Revision | None = None
    rope_scaling: Any = None
    tokenizer_revision: Revision | None = None
    quantization_param_path: Short | None = None
    max_seq_len_to_capture: int | None = Field(None, gt=0, le=MAX_TOKENS)
    disable_sliding_window: bool | None = None
    skip_tokenizer_init: bool | None = None
    served_model_name: Any = None
    override_neuron_config: Any = None
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM reads it as a JSON object
    block_size: int | None = Field(None, gt=0, le=MAX_BLOCK_SIZE)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    swap_space: float | None = Field(None, ge=0, le=MAX_COUNT)
    cache_dtype: Short | None = None
    num_gpu_blocks_override: int | None = Field(None, gt=0, le=MAX_TOKENS)
    enable_prefix_caching: bool | None = None
    max_gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    attention_backend: Short | None = None


class _AcceptedAndStored(Body):
    """Fields LLM Engine takes that mean nothing on one box; accepted so its client works."""

    gpu_type: Short | None = None
    storage: Quantity | None = None
    nodes_per_worker: int | None = Field(None, ge=1, le=1)
    optimize_costs: bool | None = None
    prewarm: bool | None = None
    high_priority: bool | None = None
    billing_tags: dict[str, Any] | None = None
    post_inference_hooks: list[str] | None = None
    default_callback_url: Short | None = None
    default_callback_auth: dict[str, Any] | None = None
    enable_startup_metrics: bool | None = None
    task_expires_seconds: int | None = Field(None, ge=0, le=MAX_SECONDS)
    queue_message_timeout_seconds: int | None = Field(None, ge=0, le=MAX_SECONDS)
    quantize: Short | None = None


class _ApplianceFields(Body):
    """The appliance's own additions."""

    gpu_memory_fraction: float | None = Field(None, gt=0, lt=1)
    idle_timeout_seconds: int | None = Field(None, ge=0, le=MAX_SECONDS)
    scale_down_window_seconds: int | None = Field(None, ge=0, le=86400)
    priority: int | None = Field(
        None, ge=-MAX_PRIORITY, le=MAX_PRIORITY, description="Admins only: who is evicted first."
    )
    env: dict[Carried, Carried] | None = None
    extra_flags: dict[Carried, Carried | int | float | bool] | None = None
    image: Short | None = None
    command: list[Carried] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    healthcheck_route: str | None = Field(None, pattern=r"^/[\w\-/.]*$")
    startup_timeout_seconds: int | None = Field(None, gt=0, le=MAX_SECONDS)
    timeout_seconds: float | None = Field(
        None, gt=0, le=86400, description="Longest a replica may stay silent on a request."
    )
    forwarder_max_concurrency: int | None = Field(
        None, ge=1, le=100_000, description="Requests the api sends one replica at once."
    )


class CreateLLMEndpointRequest(_Storable, _VllmArgs, _AcceptedAndStored, _ApplianceFields):
    model_config = BOUNDED

    name: Annotated[str, AfterValidator(_endpoint_name)] = Field(
        max_length=63, json_schema_extra={"pattern": NAME_PATTERN}
    )
    model_name: Carried = Field(min_length=1, max_length=256)
    inference_framework: Literal["vllm", "llamacpp", "custom"] = "vllm"
    source: Literal["hugging_face"] = "hugging_face"
    inference_framework_image_tag: Short = "latest"
    num_shards: int = Field(1, ge=0, le=MAX_GPUS)
    checkpoint_path: Short | None = None
    chat_template_override: Template | None = None
    endpoint_type: Literal["streaming", "sync", "async"] = "streaming"
    cpus: Quantity | None = None
    gpus: int | None = Field(None, ge=0, le=MAX_GPUS)
    memory: Quantity | None = None
    min_workers: int = Field(0, ge=0, le=MAX_WORKERS)
    max_workers: int = Field(1, ge=0, le=MAX_WORKERS)
    per_worker: int = Field(2, gt=0, le=MAX_COUNT)
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    public_inference: bool | None = Field(
        False, description="Other teams may run inference on it (nothing more); private by default."
    )


class UpdateLLMEndpointRequest(_Storable, _VllmArgs, _AcceptedAndStored, _ApplianceFields):
    model_config = BOUNDED

    model_name: Carried | None = Field(None, min_length=1, max_length=256)
    inference_framework_image_tag: Short | None = None
    num_shards: int | None = Field(None, ge=0, le=MAX_GPUS)
    checkpoint_path: Short | None = None
    chat_template_override: Template | None = None
    cpus: Quantity | None = None
    gpus: int | None = Field(None, ge=0, le=MAX_GPUS)
    memory: Quantity | None = None
    min_workers: int | None = Field(None, ge=0, le=MAX_WORKERS)
    max_workers: int | None = Field(None, ge=0, le=MAX_WORKERS)
    per_worker: int | None = Field(None, gt=0, le=MAX_COUNT)
    labels: dict[str, str] | None = None
    metadata: dict[str, Any] | None = Field(
        None,
        description="Merged into the stored metadata key by key; a key set to null is removed, "
        "so `{}` (which LLM Engine's client always sends) changes nothing.",
    )
    public_inference: bool | None = None
    force_bundle_recreation: bool | None = None
    source: Literal["hugging_face"] | None = None  # LLM Engine's client sends null
    endpoint_type: Literal["streaming", "sync", "async"] | None = Field(
        None, description="As a GET shows it; it cannot be changed."
    )


# `order_by` of the endpoint lists, LLM Engine's ModelEndpointOrderBy (unset: oldest first)
OrderBy = Literal["newest", "oldest"]


class CreateLLMEndpointResponse(BaseModel):
    endpoint_creation_task_id: str


class DeleteResponse(BaseModel):
    deleted: bool


class EndpointProgress(BaseModel):
    """`progress` in an endpoint's GET: what its replicas wait on before a container can start
    (an image pull, a download), as the builder last published it; `null` when nothing."""

    kind: Literal["image", "weights"]
    ref: str = Field(description="The image reference, or the weights' repository@revision.")
    done_bytes: int = Field(ge=0)
    total_bytes: int | None = Field(None, ge=0, description="null while not yet known.")
    done_parts: int = Field(ge=0, description="Layers (image) or files (weights) finished.")
    total_parts: int | None = Field(None, ge=0)
    fraction: float | None = Field(None, ge=0, le=1, description="done_bytes / total_bytes.")
    detail: str = Field("", description='What it is doing now: "extracting", "retrying ...".')
    description: str = Field(description="The figures in words, as `status_reason` has them.")


class EndpointView(BaseModel):
    """An endpoint's GET: LLM Engine's fields (not all listed here) and the appliance's."""

    model_config = ConfigDict(extra="allow")

    id: str
    name: str
    status: str
    status_reason: str | None = Field(
        None, description="Why the endpoint is not where its spec asks, or why it failed."
    )
    progress: EndpointProgress | None = None
