"""What each framework makes of an endpoint's server settings: the flag each one becomes, and
why the others are refused.

One table per framework, read by `builder.specs` (the command line it builds) and by the api
(`api.endpoint_specs` calls `check_args` before a row is stored, so a setting the server would
not honour is a 422 naming it, never a silent no-op). The vLLM flags are those of vLLM 0.32;
tests/images/test_vllm_contract.py parses every command line built from them with the real
vLLM's own argument parser. docs/fields.md is the same table for people.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from appliance.errors import InvalidSpecError
from appliance.models import Framework

# Endpoint setting -> vLLM 0.32 flag. A bool becomes `--flag` or `--no-flag`; a dict or list is
# passed as JSON; anything else as its text.
VLLM_FLAGS: dict[str, str] = {
    "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "dtype": "--dtype",
    "quantization": "--quantization",
    "enforce_eager": "--enforce-eager",
    "chat_template": "--chat-template",
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "trust_remote_code": "--trust-remote-code",
    "enable_prefix_caching": "--enable-prefix-caching",
    "seed": "--seed",
    "revision": "--revision",
    "code_revision": "--code-revision",
    "tokenizer": "--tokenizer",
    "tokenizer_mode": "--tokenizer-mode",
    "tokenizer_revision": "--tokenizer-revision",
    "skip_tokenizer_init": "--skip-tokenizer-init",
    "config_format": "--config-format",
    "load_format": "--load-format",
    "tool_call_parser": "--tool-call-parser",
    "enable_auto_tool_choice": "--enable-auto-tool-choice",
    "cache_dtype": "--kv-cache-dtype",
    "block_size": "--block-size",
    "num_gpu_blocks_override": "--num-gpu-blocks-override",
    "attention_backend": "--attention-backend",
    "disable_sliding_window": "--disable-sliding-window",
    "limit_mm_per_prompt": "--limit-mm-per-prompt",
    "mm_processor_kwargs": "--mm-processor-kwargs",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "enable_log_requests": "--enable-log-requests",  # from LLM Engine's disable_log_requests
}

# LLM Engine's vLLM settings that vLLM 0.32 no longer has, and what to do instead.
VLLM_REFUSED: dict[str, str] = {
    "swap_space": "vLLM 0.32 removed --swap-space: its V1 engine recomputes preempted "
    "requests instead of swapping them to CPU memory; leave it out",
    "max_seq_len_to_capture": "vLLM 0.32 removed --max-seq-len-to-capture: CUDA graph sizes "
    "are chosen by the compilation config now; leave it out",
    "quantization_param_path": "vLLM 0.32 removed --quantization-param-path: KV-cache scales "
    "are read from the checkpoint now; leave it out",
    "override_neuron_config": "vLLM 0.32 has no AWS Neuron backend; leave it out",
    "rope_scaling": "vLLM 0.32 removed --rope-scaling; pass the model config change as "
    'extra_flags {"--hf-overrides": "{\\"rope_scaling\\": ...}"} instead',
    "max_gpu_memory_utilization": "it is LLM Engine's setting for batch jobs, not endpoints; "
    "an endpoint takes gpu_memory_utilization",
}

# Endpoint setting -> llama.cpp server flag.
LLAMACPP_FLAGS: dict[str, str] = {
    "max_model_len": "--ctx-size",
    "chat_template": "--chat-template",
    "seed": "--seed",
}


# Environment a non-administrator may set, per framework: tuning knobs only. Anything else the
# server reads from its environment (plugins, dev-mode routes, its API key, host and port)
# would change what the appliance relies on, so it is an administrator's to set (within
# builder.policy's names, which hold for every container).
USER_ENV: dict[str, frozenset[str]] = {
    "vllm": frozenset(
        {
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_OMP_THREADS_BIND",
            "VLLM_LOGGING_LEVEL",
            "VLLM_ATTENTION_BACKEND",
            "VLLM_WORKER_MULTIPROC_METHOD",
            "VLLM_ENGINE_ITERATION_TIMEOUT_S",
            "NCCL_DEBUG",
            "OMP_NUM_THREADS",
            "TOKENIZERS_PARALLELISM",
            "PYTORCH_CUDA_ALLOC_CONF",
            "CUDA_DEVICE_MAX_CONNECTIONS",
        }
    ),
    "llamacpp": frozenset(
        {
            "LLAMA_ARG_THREADS",
            "LLAMA_ARG_THREADS_BATCH",
            "LLAMA_ARG_N_PARALLEL",
            "LLAMA_ARG_BATCH",
            "LLAMA_ARG_UBATCH",
            "LLAMA_ARG_N_GPU_LAYERS",
            "LLAMA_ARG_FLASH_ATTN",
            "LLAMA_ARG_CACHE_TYPE_K",
            "LLAMA_ARG_CACHE_TYPE_V",
            "LLAMA_ARG_EMBEDDINGS",  # serve /v1/embeddings (llama.cpp's --embeddings)
            "LLAMA_ARG_POOLING",  # their pooling, for a model without its own (mean, cls...)
            "OMP_NUM_THREADS",
        }
    ),
    "custom": frozenset(),  # a custom endpoint is an administrator's anyway
}
MAX_ENV_VALUE = 4096


def check_user_env(framework: str, env: Mapping[str, str], admin: bool) -> None:
    """422 naming the first variable a non-administrator may not set on `framework`."""
    for name, value in env.items():
        if len(value) > MAX_ENV_VALUE:
            raise InvalidSpecError(
                f"env {name}: values are limited to {MAX_ENV_VALUE} characters", field="env"
            )
        if not admin and name not in USER_ENV.get(framework, frozenset()):
            raise InvalidSpecError(
                f"env {name} is for administrators on a {framework} endpoint; others may set "
                f"{', '.join(sorted(USER_ENV.get(framework, ()))) or 'none'}",
                field="env",
            )


def flag_values(args: Mapping[str, Any], table: Mapping[str, str]) -> list[str]:
    """The flags for the settings in `args` that `table` maps, then `extra_flags` sorted."""
    out: list[str] = []
    for key, flag in table.items():
        value = args.get(key)
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag.removeprefix("--"))
        elif isinstance(value, dict | list):
            out.extend([flag, json.dumps(value, separators=(",", ":"))])
        else:
            out.extend([flag, str(value)])
    for flag, value in sorted(dict(args.get("extra_flags") or {}).items()):
        if value is True or value == "":  # a switch (`1` is a value: 1 == True)
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag.removeprefix("--"))
        else:
            out.extend([flag, str(value)])
    return out


def check_args(framework: str, sent: Mapping[str, Any]) -> None:
    """422 naming the first setting in `sent` that `framework` would not honour, and why."""
    for name in sent:
        if framework == Framework.VLLM:
            if name in VLLM_REFUSED:
                raise InvalidSpecError(f"{name} is refused: {VLLM_REFUSED[name]}", field=name)
        elif framework == Framework.LLAMACPP:
            if name not in LLAMACPP_FLAGS:
                raise InvalidSpecError(
                    f"{name} is a vLLM setting; a llamacpp endpoint takes "
                    f"{', '.join(sorted(LLAMACPP_FLAGS))} (and chat_template_override)",
                    field=name,
                )
        else:
            raise InvalidSpecError(
                f"{name} is a vLLM setting; a custom endpoint runs its own command, so put its "
                "server's options in `command`",
                field=name,
            )
