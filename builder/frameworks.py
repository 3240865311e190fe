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
import re
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

# vLLM 0.32's choices for the settings its parser takes from a list (its --help lists them).
VLLM_CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "bfloat16", "float", "float16", "float32", "half"),
    "cache_dtype": (
        "auto", "bfloat16", "float16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc",
        "fp8_per_token_head", "int4_per_token_head", "int8_per_token_head", "nvfp4",
        "nvfp4_4over6", "nvfp4_ds_mla", "turboquant_3bit_nc", "turboquant_4bit_nc",
        "turboquant_k3v4_nc", "turboquant_k8v4", "ultraquant_4bit",
    ),
}  # fmt: skip

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

LLAMACPP_MAX_CTX = 2**31 - 1  # llama-server reads --ctx-size as a 32-bit int
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
            "LLAMA_ARG_BATCH",
            "LLAMA_ARG_UBATCH",
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
# What a tuning variable takes, where its server fails to start on anything else (llama-server:
# "error while handling environment variable") or reads it as nothing: a whole number within
# bounds, or the words it knows. Held for administrators too; variables not here are free text.
Bounds = tuple[int, int]
THREADS: Bounds = (-1, 1024)  # llama.cpp: 0 or less is every core
BATCH: Bounds = (1, 1 << 20)
SWITCH_WORDS = frozenset({"on", "off", "enabled", "disabled", "true", "false", "1", "0"})
ENV_VALUES: dict[str, dict[str, Bounds | frozenset[str]]] = {
    "llamacpp": {
        "LLAMA_ARG_THREADS": THREADS,
        "LLAMA_ARG_THREADS_BATCH": THREADS,
        "LLAMA_ARG_BATCH": BATCH,
        "LLAMA_ARG_UBATCH": BATCH,
        "LLAMA_ARG_FLASH_ATTN": SWITCH_WORDS | {"auto", "-1"},
        "LLAMA_ARG_CACHE_TYPE_K": frozenset(
            {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"}
        ),
        "LLAMA_ARG_EMBEDDINGS": SWITCH_WORDS,
        "LLAMA_ARG_POOLING": frozenset({"none", "mean", "cls", "last", "rank"}),
        "OMP_NUM_THREADS": (1, 1024),
    },
    "vllm": {
        "VLLM_CPU_KVCACHE_SPACE": (0, 1 << 20),  # GiB
        "VLLM_ENGINE_ITERATION_TIMEOUT_S": (1, 86_400),
        "VLLM_WORKER_MULTIPROC_METHOD": frozenset({"fork", "spawn"}),
        "OMP_NUM_THREADS": (1, 1024),
        "CUDA_DEVICE_MAX_CONNECTIONS": (1, 32),
    },
}
ENV_VALUES["llamacpp"]["LLAMA_ARG_CACHE_TYPE_V"] = ENV_VALUES["llamacpp"]["LLAMA_ARG_CACHE_TYPE_K"]
# llama-server reads its environment first and its command line after: what the appliance puts
# on the command line wins, so these would change nothing.
LLAMACPP_COMMAND_LINE_ENV = {
    "LLAMA_ARG_N_PARALLEL": "the endpoint's per_worker sets llama.cpp's --parallel",
    "LLAMA_ARG_N_GPU_LAYERS": "a replica with GPUs offloads every layer (-ngl 999), one "
    "without has none to offload",
}


def check_user_env(framework: str, env: Mapping[str, str], admin: bool) -> None:
    """422 naming the first variable a non-administrator may not set on `framework`, or that
    no one may set to its value (`ENV_VALUES`) or at all (`LLAMACPP_COMMAND_LINE_ENV`)."""
    for name, value in env.items():
        if len(value) > MAX_ENV_VALUE:
            raise InvalidSpecError(
                f"env {name}: values are limited to {MAX_ENV_VALUE} characters", field="env"
            )
        why = LLAMACPP_COMMAND_LINE_ENV.get(name) if framework == Framework.LLAMACPP else None
        if why is not None:
            raise InvalidSpecError(f"env {name} would change nothing: {why}", field="env")
        if not admin and name not in USER_ENV.get(framework, frozenset()):
            raise InvalidSpecError(
                f"env {name} is for administrators on a {framework} endpoint; others may set "
                f"{', '.join(sorted(USER_ENV.get(framework, ()))) or 'none'}",
                field="env",
            )
        takes = ENV_VALUES.get(framework, {}).get(name)
        if takes is not None and not _env_takes(takes, value):
            raise InvalidSpecError(
                f"env {name}: {value!r} is not a value its server takes; it takes "
                + (
                    f"a whole number from {takes[0]} to {takes[1]}"
                    if isinstance(takes, tuple)
                    else "one of " + ", ".join(sorted(takes))
                ),
                field="env",
            )


def _env_takes(takes: Bounds | frozenset[str], value: str) -> bool:
    if isinstance(takes, frozenset):
        return value in takes  # as the server compares them: exactly
    digits = value.removeprefix("-")
    whole = digits.isascii() and digits.isdigit() and len(digits) < 10
    return whole and takes[0] <= int(value) <= takes[1]


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


NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's negative numbers: values, not flags


def read_as_flag(value: str) -> bool:
    """Whether vLLM's parser (argparse) reads this text, sent as a flag's value, as the next flag
    instead, and refuses the line ("expected one argument"): it starts with `-` and is neither
    a negative number nor holds a space."""
    return value.startswith("-") and " " not in value and NUMBER.match(value) is None


# The names vLLM reads from object storage itself, from inside the replica (its Run:ai streamer,
# with the box's cloud credentials, which it asks the cloud's metadata service for), where it
# reads any other from the hub or a path: `vllm.transformers_utils.utils.is_cloud_storage`
OBJECT_STORAGE = ("s3://", "gs://", "az://")


def in_object_storage(value: str) -> bool:
    """Whether vLLM would fetch a model or tokenizer so named from object storage: a host the
    operator never chose, reached with the box's own credentials."""
    return value.lower().startswith(OBJECT_STORAGE)


def object_storage_refusal(name: str, value: str, field: str | None = None) -> InvalidSpecError:
    """The 422 for `name`'s `value` that `in_object_storage` finds, naming `field` (or `name`)."""
    return InvalidSpecError(
        f"{name} {value!r} names object storage, which replicas here never read from: name a "
        "Hugging Face repository or a path in the models directory",
        field=field or name,
    )


def check_args(framework: str, sent: Mapping[str, Any]) -> None:
    """422 naming the first setting in `sent` that `framework` would not honour, and why."""
    for name in sent:
        if framework == Framework.VLLM:
            if name in VLLM_REFUSED:
                raise InvalidSpecError(f"{name} is refused: {VLLM_REFUSED[name]}", field=name)
            if isinstance(sent[name], str) and in_object_storage(sent[name]):
                raise object_storage_refusal(name, sent[name])
            if isinstance(sent[name], str) and read_as_flag(sent[name]):
                raise InvalidSpecError(
                    f"{name} {sent[name]!r} starts with '-', which vLLM's parser reads as the "
                    "next flag (the replica could not start); send the value itself",
                    field=name,
                )
            choices = VLLM_CHOICES.get(name)
            if choices is not None and sent[name] not in (*choices, ""):  # "": clears it
                raise InvalidSpecError(
                    f"{name} {sent[name]!r} is not one vLLM 0.32 takes: {', '.join(choices)}",
                    field=name,
                )
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
