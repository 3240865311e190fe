"""The endpoint fields a create request may set, each with a sample value and what it must
become in the replica's command line: shared by the field tests (tests/builder/test_fields.py)
and the command-line contract test, which parses every one of these command lines with the
real vLLM's own parser (tests/images/test_vllm_contract.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from api import endpoint_specs
from api.schemas import CreateLLMEndpointRequest
from appliance.keys import Caller
from appliance.models import Endpoint
from appliance.settings import Settings

ADMIN = Caller("key_admin", "admin", "ops", frozenset({"manage", "inference"}), is_admin=True)
USER = Caller("key_user", "ana", "ml", frozenset({"manage", "inference"}), is_admin=False)

# (field values, the flags they must add, in order); gpus 1 unless the case says otherwise
VLLM_FLAG_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "max_model_len": ({"max_model_len": 2048}, ["--max-model-len", "2048"]),
    "max_num_seqs": ({"max_num_seqs": 8}, ["--max-num-seqs", "8"]),
    "enforce_eager": ({"enforce_eager": True}, ["--enforce-eager"]),
    "enforce_eager=false": ({"enforce_eager": False}, ["--no-enforce-eager"]),
    "trust_remote_code": ({"trust_remote_code": True}, ["--trust-remote-code"]),
    "pipeline_parallel_size": (
        {"pipeline_parallel_size": 2, "gpus": 4},
        ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2"],
    ),
    "tensor_parallel_size": (
        {"tensor_parallel_size": 2, "gpus": 2},
        ["--tensor-parallel-size", "2"],
    ),
    "quantization": ({"quantization": "awq"}, ["--quantization", "awq"]),
    "quantize": ({"quantize": "awq"}, ["--quantization", "awq"]),
    "disable_log_requests": ({"disable_log_requests": True}, ["--no-enable-log-requests"]),
    "disable_log_requests=false": (
        {"disable_log_requests": False},
        ["--enable-log-requests"],
    ),
    "chat_template": (
        {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"},
        ["--chat-template", "{% for m in messages %}{{ m.content }}{% endfor %}"],
    ),
    "chat_template_override": (
        {"chat_template_override": "{{ messages[0].content }}"},
        ["--chat-template", "{{ messages[0].content }}"],
    ),
    "tool_call_parser": (
        {"tool_call_parser": "hermes", "enable_auto_tool_choice": True},
        ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"],
    ),
    "load_format": ({"load_format": "safetensors"}, ["--load-format", "safetensors"]),
    "config_format": ({"config_format": "hf"}, ["--config-format", "hf"]),
    "tokenizer_mode": ({"tokenizer_mode": "slow"}, ["--tokenizer-mode", "slow"]),
    "limit_mm_per_prompt": (
        {"limit_mm_per_prompt": {"image": 2}},
        ["--limit-mm-per-prompt", '{"image":2}'],
    ),
    "max_num_batched_tokens": (
        {"max_num_batched_tokens": 4096},
        ["--max-num-batched-tokens", "4096"],
    ),
    "tokenizer": ({"tokenizer": "acme/tokenizer"}, ["--tokenizer", "acme/tokenizer"]),
    "dtype": ({"dtype": "bfloat16"}, ["--dtype", "bfloat16"]),
    "seed": ({"seed": 7}, ["--seed", "7"]),
    "revision": ({"revision": "v2"}, ["--revision", "v2"]),
    "code_revision": ({"code_revision": "v2"}, ["--code-revision", "v2"]),
    "tokenizer_revision": ({"tokenizer_revision": "v2"}, ["--tokenizer-revision", "v2"]),
    "disable_sliding_window": ({"disable_sliding_window": True}, ["--disable-sliding-window"]),
    "skip_tokenizer_init": ({"skip_tokenizer_init": True}, ["--skip-tokenizer-init"]),
    "served_model_name": ({"served_model_name": "ep"}, []),
    "mm_processor_kwargs": (
        {"mm_processor_kwargs": {"num_crops": 4}},
        ["--mm-processor-kwargs", '{"num_crops":4}'],
    ),
    "block_size": ({"block_size": 32}, ["--block-size", "32"]),
    "gpu_memory_utilization": (
        {"gpu_memory_utilization": 0.8},
        ["--gpu-memory-utilization", "0.8"],
    ),
    "gpu_memory_fraction": (
        {"gpu_memory_fraction": 0.5},
        ["--gpu-memory-utilization", "0.5"],
    ),
    "cache_dtype": ({"cache_dtype": "fp8"}, ["--kv-cache-dtype", "fp8"]),
    "num_gpu_blocks_override": (
        {"num_gpu_blocks_override": 100},
        ["--num-gpu-blocks-override", "100"],
    ),
    "enable_prefix_caching": ({"enable_prefix_caching": True}, ["--enable-prefix-caching"]),
    "enable_prefix_caching=false": (
        {"enable_prefix_caching": False},
        ["--no-enable-prefix-caching"],
    ),
    "attention_backend": (
        {"attention_backend": "FLASH_ATTN"},
        ["--attention-backend", "FLASH_ATTN"],
    ),
    "num_shards": ({"num_shards": 2}, ["--tensor-parallel-size", "2"]),
    "gpus=8": ({"gpus": 8}, ["--tensor-parallel-size", "8"]),
    "gpus=0": ({"gpus": 0}, ["--tensor-parallel-size", "1"]),
    "extra_flags": (
        {"extra_flags": {"--max-logprobs": 5, "--disable-log-stats": True}},
        ["--disable-log-stats", "--max-logprobs", "5"],
    ),
}


def settings(models_dir: Path) -> Settings:
    return Settings(
        data_dir=models_dir.parent,
        models_dir=models_dir,
        approved_images=["vllm/vllm-openai:v0.32.1"],
        callback_allowed_hosts=["localhost:9"],
    )


def build(
    models_dir: Path, fields: dict[str, Any], caller: Caller = ADMIN, **overrides: Any
) -> Endpoint:
    """The endpoint row a create request with these fields makes (422s raise)."""
    body: dict[str, Any] = {
        "name": "ep",
        "model_name": "acme/model-1b",
        "inference_framework": "vllm",
        "gpus": 1,
        **fields,
        **overrides,
    }
    if "num_shards" in fields and "gpus" not in fields:
        body.pop("gpus")
    request = CreateLLMEndpointRequest.model_validate(body)
    return endpoint_specs.new_endpoint(request, caller, settings(models_dir), hidden=frozenset())


def extra_flag_values() -> dict[str, str | bool]:
    """A sample value for every flag the extra_flags allowlist lets through."""
    return {
        "--max-logprobs": "5",
        "--disable-log-stats": True,
        "--generation-config": "vllm",
        "--override-generation-config": '{"temperature":0.5}',
        "--reasoning-parser": "deepseek_r1",
        "--structured-outputs-config": '{"backend":"xgrammar"}',
        "--cpu-offload-gb": "1",
        "--scheduling-policy": "priority",
        "--speculative-config": '{"method":"ngram","num_speculative_tokens":2,'
        '"prompt_lookup_max":3}',
        "--hf-overrides": '{"rope_theta":10000}',
        "--uvicorn-log-level": "warning",
        "--kv-cache-memory-bytes": "1G",  # a size, as vLLM reads one
        "--enable-chunked-prefill": True,
        "--runner": "pooling",
        "--convert": "embed",
    }
