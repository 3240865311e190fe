"""Request and response bodies of the endpoint routes, in LLM Engine's shapes plus our fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
Quantity = str | int | float

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


class _VllmArgs(BaseModel):
    max_model_len: int | None = Field(None, gt=0)
    max_num_seqs: int | None = Field(None, gt=0)
    enforce_eager: bool | None = None
    trust_remote_code: bool | None = None
    pipeline_parallel_size: int | None = Field(None, gt=0)
    tensor_parallel_size: int | None = Field(None, gt=0)
    quantization: str | None = None
    disable_log_requests: bool | None = None
    chat_template: str | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool | None = None
    load_format: str | None = None
    config_format: str | None = None
    tokenizer_mode: str | None = None
    limit_mm_per_prompt: Any = None
    max_num_batched_tokens: int | None = Field(None, gt=0)
    tokenizer: str | None = None
    dtype: str | None = None
    seed: int | None = None
    revision: str | None = None
    code_revision: str | None = None
    rope_scaling: Any = None
    tokenizer_revision: str | None = None
    quantization_param_path: str | None = None
    max_seq_len_to_capture: int | None = None
    disable_sliding_window: bool | None = None
    skip_tokenizer_init: bool | None = None
    served_model_name: Any = None
    override_neuron_config: Any = None
    mm_processor_kwargs: Any = None
    block_size: int | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    swap_space: float | None = None
    cache_dtype: str | None = None
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool | None = None
    max_gpu_memory_utilization: float | None = None
    attention_backend: str | None = None


class _AcceptedAndStored(BaseModel):
    """Fields LLM Engine takes that mean nothing on one box; accepted so its client works."""

    gpu_type: str | None = None
    storage: Quantity | None = None
    nodes_per_worker: int | None = Field(None, ge=1, le=1)
    optimize_costs: bool | None = None
    prewarm: bool | None = None
    high_priority: bool | None = None
    billing_tags: dict[str, Any] | None = None
    post_inference_hooks: list[str] | None = None
    default_callback_url: str | None = None
    default_callback_auth: dict[str, Any] | None = None
    enable_startup_metrics: bool | None = None
    task_expires_seconds: int | None = None
    queue_message_timeout_seconds: int | None = None
    quantize: str | None = None


class _ApplianceFields(BaseModel):
    """The appliance's own additions."""

    gpu_memory_fraction: float | None = Field(None, gt=0, lt=1)
    idle_timeout_seconds: int | None = Field(None, ge=0)
    scale_down_window_seconds: int | None = Field(None, ge=0, le=86400)
    priority: int | None = None
    env: dict[str, str] | None = None
    extra_flags: dict[str, str | int | float | bool] | None = None
    image: str | None = None
    command: list[str] | None = None
    port: int | None = Field(None, ge=1, le=65535)
    healthcheck_route: str | None = Field(None, pattern=r"^/[\w\-/.]*$")
    startup_timeout_seconds: int | None = Field(None, gt=0)
    timeout_seconds: float | None = Field(
        None, gt=0, le=86400, description="Longest a replica may stay silent on a request."
    )
    forwarder_max_concurrency: int | None = Field(
        None, ge=1, le=100_000, description="Requests the api sends one replica at once."
    )


class CreateLLMEndpointRequest(_VllmArgs, _AcceptedAndStored, _ApplianceFields):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    model_name: str = Field(min_length=1, max_length=256)
    inference_framework: Literal["vllm", "llamacpp", "custom"] = "vllm"
    source: Literal["hugging_face"] = "hugging_face"
    inference_framework_image_tag: str = "latest"
    num_shards: int = Field(1, ge=0)
    checkpoint_path: str | None = None
    chat_template_override: str | None = None
    endpoint_type: Literal["streaming", "sync", "async"] = "streaming"
    cpus: Quantity | None = None
    gpus: int | None = Field(None, ge=0)
    memory: Quantity | None = None
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(1, ge=0, le=64)
    per_worker: int = Field(2, gt=0)
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    public_inference: bool | None = True


class UpdateLLMEndpointRequest(_VllmArgs, _AcceptedAndStored, _ApplianceFields):
    model_config = ConfigDict(extra="forbid")

    model_name: str | None = Field(None, min_length=1, max_length=256)
    inference_framework_image_tag: str | None = None
    num_shards: int | None = Field(None, ge=0)
    checkpoint_path: str | None = None
    chat_template_override: str | None = None
    cpus: Quantity | None = None
    gpus: int | None = Field(None, ge=0)
    memory: Quantity | None = None
    min_workers: int | None = Field(None, ge=0)
    max_workers: int | None = Field(None, ge=0, le=64)
    per_worker: int | None = Field(None, gt=0)
    labels: dict[str, str] | None = None
    metadata: dict[str, Any] | None = Field(
        None,
        description="Merged into the stored metadata key by key; a key set to null is removed, "
        "so `{}` (which LLM Engine's client always sends) changes nothing.",
    )
    public_inference: bool | None = None
    force_bundle_recreation: bool | None = None
    source: Literal["hugging_face"] | None = None  # LLM Engine's client sends null


class CreateLLMEndpointResponse(BaseModel):
    endpoint_creation_task_id: str


class DeleteResponse(BaseModel):
    deleted: bool
