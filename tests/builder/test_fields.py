"""Every field a create or update request accepts has an effect on the replica (its command
line, image, environment or resources) or is refused with a 422 that names it and says why.
docs/fields.md is the same list for people."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from api import endpoint_specs, endpoint_updates, server_args
from api.schemas import UpdateLLMEndpointRequest
from appliance.errors import InvalidSpecError
from appliance.models import Endpoint
from builder.specs import container_spec, server_command
from tests.builder.field_cases import ADMIN, USER, VLLM_FLAG_CASES, build, settings

T = "{{ messages[0].content }}"  # a chat template


@pytest.fixture
def models(tmp_path: Path) -> Path:
    models_dir = tmp_path / "models"
    (models_dir / "gemma-hf").mkdir(parents=True)
    (models_dir / "gemma-hf" / "config.json").write_text("{}")
    (models_dir / "gemma.gguf").write_bytes(b"GGUF")
    return models_dir


def command(endpoint: Endpoint) -> list[str]:
    return list(server_command(endpoint)[0])


def contains(argv: list[str], part: list[str]) -> bool:
    return any(argv[i : i + len(part)] == part for i in range(len(argv) - len(part) + 1))


def spec(endpoint: Endpoint, models: Path) -> Any:
    return container_spec(
        endpoint,
        settings=settings(models),
        install_id="i",
        replica_id="rep_abcdef",
        gpu_ids=(),
        gpu_fraction=1.0,
    )


@pytest.mark.parametrize("case", sorted(VLLM_FLAG_CASES))
def test_each_vllm_setting_becomes_its_flag(case: str, models: Path) -> None:
    fields, flags = VLLM_FLAG_CASES[case]
    argv = command(build(models, fields))
    assert contains(argv, flags), argv
    assert argv.count("--served-model-name") == 1 and argv.count("--tensor-parallel-size") == 1


@pytest.mark.parametrize(
    "field",
    [
        "swap_space",
        "max_seq_len_to_capture",
        "quantization_param_path",
        "override_neuron_config",
        "rope_scaling",
        "max_gpu_memory_utilization",
    ],
)
def test_vllm_settings_that_vllm_dropped_are_refused_saying_why(field: str, models: Path) -> None:
    value: Any = {
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "override_neuron_config": {"a": 1},
        "quantization_param_path": "scales.json",
    }.get(field, 1)
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {field: value})
    assert refused.value.field == field
    assert "vLLM 0.32" in refused.value.message or "batch jobs" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"served_model_name": "other"}, "served_model_name"),
        ({"tensor_parallel_size": 2, "gpus": 1}, "tensor_parallel_size"),
        ({"pipeline_parallel_size": 2, "gpus": 3}, "pipeline_parallel_size"),
        ({"quantize": "awq", "quantization": "gptq"}, "quantize"),
        ({"num_shards": 2, "gpus": 4}, "num_shards"),
        ({"command": ["serve"]}, "command"),
        ({"port": 9000}, "port"),
        ({"healthcheck_route": "/ready"}, "healthcheck_route"),
        ({"storage": "40Gi"}, "storage"),
        ({"optimize_costs": True}, "optimize_costs"),
        ({"prewarm": True}, "prewarm"),
        ({"billing_tags": {"a": "b"}}, "billing_tags"),
        ({"enable_startup_metrics": True}, "enable_startup_metrics"),
        ({"task_expires_seconds": 60}, "task_expires_seconds"),
        ({"queue_message_timeout_seconds": 60}, "queue_message_timeout_seconds"),
        ({"post_inference_hooks": ["logging"]}, "post_inference_hooks"),
        ({"default_callback_url": "http://127.0.0.1:9/cb"}, "default_callback_url"),
        ({"extra_flags": {"--port": "1"}}, "extra_flags"),
        ({"inference_framework_image_tag": "v0.31.0"}, "inference_framework_image_tag"),
    ],
)
def test_vllm_fields_without_an_effect_are_refused(
    fields: dict[str, Any], named: str, models: Path
) -> None:
    with pytest.raises(InvalidSpecError) as refused:
        build(models, fields, caller=USER)
    assert refused.value.field == named, refused.value.message


@pytest.mark.parametrize(
    "named", ["tokenizer", "revision", "code_revision", "load_format", "tool_call_parser"]
)
def test_a_vllm_setting_its_parser_reads_as_a_flag_is_refused_naming_it(
    named: str, models: Path
) -> None:
    """vLLM's parser reads a value starting with `-` (`--help`, `-x`) as the next flag and
    refuses the line ("expected one argument"): the replica could never start."""
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {named: "--help"}, caller=USER)
    assert refused.value.field == named, refused.value.message
    assert "starts with '-'" in refused.value.message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"dtype": "/etc/passwd"}, "dtype"),
        ({"dtype": "FLOAT16"}, "dtype"),
        ({"cache_dtype": "fp4"}, "cache_dtype"),
        ({"cache_dtype": " "}, "cache_dtype"),
    ],
)
def test_a_vllm_setting_outside_its_choices_is_refused_naming_it(
    fields: dict[str, Any], named: str, models: Path
) -> None:
    """vLLM's parser takes `--dtype` and `--kv-cache-dtype` from a list; anything else only
    failed the replica's start ("invalid choice")."""
    with pytest.raises(InvalidSpecError) as refused:
        build(models, fields, caller=USER)
    assert refused.value.field == named, refused.value.message
    assert "bfloat16" in refused.value.message, refused.value.message
    value = {"dtype": "bfloat16", "cache_dtype": "fp8_e4m3"}[named]
    assert build(models, {named: value}, caller=USER).args[named] == value


@pytest.mark.parametrize(
    "flags",
    [
        {"--enable-chunked-prefill": "yes"},  # a switch takes true or false
        {"--disable-log-stats": False},  # vLLM has no --no-disable-log-stats
        {"--max-logprobs": True},  # was sent with no value
        {"--max-logprobs": ""},
        {"--max-logprobs": 2.5},
        {"--max-logprobs": "1e308"},
        {"--max-logprobs": 10**12},
        {"--cpu-offload-gb": -1},
        {"--cpu-offload-gb": "NaN"},
        {"--kv-cache-memory-bytes": 0},
        {"--kv-cache-memory-bytes": "512Mi"},
        {"--kv-cache-memory-bytes": "1.5G"},  # decimals only with k, m, g, t
        {"--scheduling-policy": "lifo"},
        {"--uvicorn-log-level": "loud"},
        {"--runner": "draft"},  # vLLM's, but no route here serves a draft model
        {"--convert": "classify"},  # its /classify is not routed
        {"--hf-overrides": "not json"},
        {"--hf-overrides": "[" * 5000 + "]" * 5000},  # past what a JSON reader recurses
        {"--speculative-config": "[]"},
        {"--generation-config": ""},
        {"--reasoning-parser": " "},
        {"--reasoning-parser": "--help"},  # read as the next flag
    ],
)
def test_extra_flag_values_vllm_would_refuse_are_refused_naming_the_flag(
    flags: dict[str, Any], models: Path
) -> None:
    """vLLM's own parser refuses these (or its engine fails on them), so a replica would only
    crash-loop: each is a 400 naming extra_flags and the flag."""
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {"extra_flags": flags})
    assert refused.value.field == "extra_flags", refused.value.message
    assert next(iter(flags)) in refused.value.message


def test_extra_flag_values_become_the_flags_vllm_reads(models: Path) -> None:
    """An integer 1 is a value, not a switch; a switch's false is its --no- form."""
    sent = {
        "--max-logprobs": 1,
        "--enable-chunked-prefill": False,
        "--cpu-offload-gb": 1.5,
        "--kv-cache-memory-bytes": "4G",
        "--scheduling-policy": "priority",
    }
    assert command(build(models, {"extra_flags": sent}))[-9:] == [  # last, sorted
        "--cpu-offload-gb",
        "1.5",
        "--no-enable-chunked-prefill",
        "--kv-cache-memory-bytes",
        "4G",
        "--max-logprobs",
        "1",
        "--scheduling-policy",
        "priority",
    ]


def test_gpus_zero_runs_the_vllm_cpu_image_with_a_kv_cache_inside_its_memory(
    models: Path,
) -> None:
    endpoint = build(models, {"gpus": 0, "memory": "8Gi", "checkpoint_path": "gemma-hf"})
    made = spec(endpoint, models)
    assert made.image == settings(models).vllm_cpu_image
    assert made.env["VLLM_CPU_KVCACHE_SPACE"] == "2"  # a quarter of 8 GiB
    assert made.env["HF_HUB_OFFLINE"] == "1"  # a model from the models directory
    assert made.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"  # replicas share the cores
    assert made.env["OMP_NUM_THREADS"] == str(int(endpoint.cpus))  # a thread per CPU it has
    one = spec(build(models, {"gpus": 0, "cpus": "1500m"}), models)
    assert (one.env["OMP_NUM_THREADS"], one.nano_cpus) == ("1", 15 * 10**8)
    two = spec(build(models, {"gpus": 0, "cpus": 2}), models)
    assert two.env["OMP_NUM_THREADS"] == str(min(2, os.cpu_count() or 1))
    set_by_hand = {"gpus": 0, "cpus": 2, "env": {"OMP_NUM_THREADS": "1"}}
    assert spec(build(models, set_by_hand), models).env["OMP_NUM_THREADS"] == "1"
    assert command(endpoint)[0] == "/models/gemma-hf"
    on_gpu = spec(build(models, {"gpus": 1}), models)
    assert (
        on_gpu.image == settings(models).vllm_image and "VLLM_CPU_KVCACHE_SPACE" not in on_gpu.env
    )
    own = spec(build(models, {"gpus": 0, "env": {"VLLM_CPU_KVCACHE_SPACE": "5"}}), models)
    assert own.env["VLLM_CPU_KVCACHE_SPACE"] == "5"


def test_image_tag_cpus_memory_env_and_priority_reach_the_replica(models: Path) -> None:
    endpoint = build(
        models,
        {
            "inference_framework_image_tag": "v0.32.1",
            "cpus": "500m",
            "memory": "3Gi",
            "env": {"VLLM_LOGGING_LEVEL": "DEBUG"},
            "high_priority": True,
        },
        caller=ADMIN,
    )
    made = spec(endpoint, models)
    assert made.image == "vllm/vllm-openai:v0.32.1"
    assert made.memory_bytes == 3 * 2**30 and made.env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert endpoint.priority == endpoint_specs.HIGH_PRIORITY
    assert build(models, {"inference_framework_image_tag": "v0.32.0"}, caller=USER).image is None


def test_llamacpp_takes_its_own_settings_and_refuses_vllm_ones(models: Path) -> None:
    llama = {"inference_framework": "llamacpp", "checkpoint_path": "gemma.gguf", "gpus": 0}
    argv = command(
        build(
            models,
            {
                **llama,
                "per_worker": 1,
                "max_model_len": 1024,
                "seed": 3,
                "chat_template_override": T,
            },
        )
    )
    assert contains(argv, ["--ctx-size", "1024", "--chat-template", T, "--seed", "3"])
    one_cpu = spec(build(models, {**llama, "cpus": 1}), models)
    assert one_cpu.env["LLAMA_ARG_THREADS"] == "1"  # not one per host core
    own = spec(build(models, {**llama, "cpus": 1, "env": {"LLAMA_ARG_THREADS": "2"}}), models)
    assert own.env["LLAMA_ARG_THREADS"] == "2"
    for field, value in [("dtype", "half"), ("quantize", "awq"), ("num_shards", 2)]:
        with pytest.raises(InvalidSpecError) as refused:
            build(models, {**llama, field: value})
        assert refused.value.field == field


def test_llamacpp_gives_each_slot_max_model_len(models: Path) -> None:
    """llama-server splits --ctx-size among its --parallel slots: `max_model_len: 4096` at
    `per_worker: 3` gave each request 1536 tokens, and an 1802-token prompt was refused."""
    llama = {"inference_framework": "llamacpp", "checkpoint_path": "gemma.gguf", "gpus": 0}
    argv = command(build(models, {**llama, "per_worker": 3, "max_model_len": 4096}))
    assert contains(argv, ["--parallel", "3"])
    assert contains(argv, ["--ctx-size", str(3 * 4096)])
    assert "--kv-unified" not in argv  # each slot its own cache, none waits on another's room
    default = command(build(models, {**llama, "per_worker": 3}))
    assert "--ctx-size" not in default  # llama-server's own: the model's context, split


def update(endpoint: Endpoint, models: Path, **fields: Any) -> bool:
    request = UpdateLLMEndpointRequest.model_validate(fields)
    return endpoint_updates.apply_update(
        endpoint, request, ADMIN, settings(models), hidden=frozenset()
    )


def test_updates_honour_num_shards_high_priority_quantize_tag_and_callbacks(
    models: Path,
) -> None:
    endpoint = build(models, {})
    assert update(endpoint, models, num_shards=2)
    assert endpoint.gpus == 2 and contains(command(endpoint), ["--tensor-parallel-size", "2"])
    update(endpoint, models, high_priority=True)
    assert endpoint.priority == endpoint_specs.HIGH_PRIORITY
    assert update(endpoint, models, quantize="awq")
    assert contains(command(endpoint), ["--quantization", "awq"])
    assert update(endpoint, models, inference_framework_image_tag="v0.32.1")
    assert endpoint.image == "vllm/vllm-openai:v0.32.1"
    update(endpoint, models, default_callback_url="http://localhost:9/done")
    assert endpoint.extra["default_callback_url"] == "http://localhost:9/done"
    with pytest.raises(InvalidSpecError) as refused:
        update(endpoint, models, swap_space=4)
    assert refused.value.field == "swap_space"


def test_gpu_type_is_honoured_only_where_the_box_has_that_gpu() -> None:
    h100s = ["NVIDIA H100 80GB HBM3"] * 8
    server_args.check_gpu_type("nvidia-hopper-h100", 1, h100s)
    server_args.check_gpu_type("nvidia-ampere-a10", 1, ["NVIDIA A10G"])
    server_args.check_gpu_type(None, 0, None)
    for gpu_type, gpus, names in [
        ("nvidia-ampere-a10", 1, ["NVIDIA A100-SXM4-80GB"]),  # an A100 is not an A10
        ("nvidia-tesla-t4", 1, h100s),
        ("nvidia-hopper-h100", 0, h100s),
        ("nvidia-hopper-h100", 1, None),  # the builder has not reported yet
        ("nvidia-hopper-h200", 1, h100s),
    ]:
        with pytest.raises(InvalidSpecError) as refused:
            server_args.check_gpu_type(gpu_type, gpus, names)
        assert refused.value.field == "gpu_type"


def test_a_llamacpp_context_past_what_its_server_reads_is_refused(models: Path) -> None:
    """llama.cpp's --ctx-size is max_model_len times per_worker (a slot's context each) and
    an int of 32 bits: past 2147483647 llama-server failed to start on it ("stoi"), so a
    request is a 400 naming max_model_len, on create and update; vLLM's has no such bound."""
    llama = {"inference_framework": "llamacpp", "checkpoint_path": "gemma.gguf", "gpus": 0}
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {**llama, "max_model_len": 1 << 26, "per_worker": 64})
    assert refused.value.field == "max_model_len", refused.value.message
    assert "2147483647" in refused.value.message and "per_worker" in refused.value.message
    endpoint = build(models, {**llama, "max_model_len": 1 << 20, "per_worker": 2})
    with pytest.raises(InvalidSpecError):
        update(endpoint, models, per_worker=4096)
    assert build(models, {"max_model_len": 1 << 26, "per_worker": 64}).args["max_model_len"]


# An endpoint of each framework on the CPU: llama.cpp serves a GGUF file, vLLM a model's weights.
ON_CPU: dict[str, dict[str, object]] = {
    "vllm": {"inference_framework": "vllm", "model_name": "acme/model-1b", "gpus": 0},
    "llamacpp": {"inference_framework": "llamacpp", "checkpoint_path": "gemma.gguf", "gpus": 0},
}


@pytest.mark.parametrize("framework", ["vllm", "llamacpp"])
@pytest.mark.parametrize("field", ["chat_template", "chat_template_override"])
def test_a_chat_template_that_is_no_template_is_refused_saying_what_to_send(
    framework: str, field: str, models: Path
) -> None:
    """llama.cpp, run with --jinja, renders a bare name such as "gemma" as the prompt itself
    (every chat gets 3 prompt tokens and the same answer), and vLLM fails to start on it."""
    fields = ON_CPU[framework]
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {**fields, field: "gemma"})
    assert refused.value.field == field
    assert f"{field} 'gemma' is not a Jinja template: send the template" in refused.value.message
    endpoint = build(models, fields)
    with pytest.raises(InvalidSpecError) as refused_update:
        update(endpoint, models, **{field: "gemma"})
    assert refused_update.value.field == field


def test_vllm_also_reads_a_template_file_in_its_image(models: Path) -> None:
    path = "/templates/chat.jinja"
    assert contains(command(build(models, {"chat_template": path})), ["--chat-template", path])
    assert contains(command(build(models, {"chat_template": "{% if x %}"})), ["{% if x %}"])
    llama = {"inference_framework": "llamacpp", "checkpoint_path": "gemma.gguf", "gpus": 0}
    with pytest.raises(InvalidSpecError) as refused:
        build(models, {**llama, "chat_template": path})  # llama.cpp reads no file by this flag
    assert refused.value.field == "chat_template" and "file" not in refused.value.message


@pytest.mark.parametrize("framework", ["vllm", "llamacpp"])
@pytest.mark.parametrize("field", ["chat_template", "chat_template_override"])
def test_an_empty_chat_template_clears_it(framework: str, field: str, models: Path) -> None:
    """On update null leaves the template as it is and "" drops it: the server uses the
    model's own again. vLLM would refuse `--chat-template ""`, so no flag is emitted."""
    fields = ON_CPU[framework]
    endpoint = build(models, {**fields, field: T})
    assert contains(command(endpoint), ["--chat-template", T])
    update(endpoint, models, chat_template=None, chat_template_override=None, max_workers=2)
    assert endpoint.args["chat_template"] == T
    assert update(endpoint, models, **{field: ""})
    assert "chat_template" not in endpoint.args and "--chat-template" not in command(endpoint)
    assert "--chat-template" not in command(build(models, {**fields, field: ""}))


@pytest.mark.parametrize(
    ("fields", "flag"),
    [
        ({"quantize": "awq"}, "--quantization"),
        ({"quantization": "awq"}, "--quantization"),
        ({"dtype": "half"}, "--dtype"),
        ({"tokenizer": "org/tok"}, "--tokenizer"),
    ],
)
def test_an_empty_server_setting_clears_it(fields: dict[str, str], flag: str, models: Path) -> None:
    """A string server setting sent as "" is cleared, as a chat template is: the server's own
    default again, where the flag went to vLLM with an empty value and the replica could not
    start (`--quantization ''`). So a setting set by mistake can be taken back, even through
    LLM Engine's client, whose null means "unchanged"."""
    endpoint = build(models, fields)
    assert flag in command(endpoint)
    assert update(endpoint, models, **{name: "" for name in fields})
    assert flag not in command(endpoint), command(endpoint)
    assert flag not in command(build(models, {name: "" for name in fields}))


@pytest.mark.parametrize("cpus", ["\u0661", "\u0660.\u0665", "\uff11", "1_0m", "0x1", "1e-400000"])
def test_cpus_are_ascii_digits_as_kubernetes_writes_them(cpus: str, models: Path) -> None:
    """Python's float() reads any script's digits (Arabic-Indic one, U+0661, is 1), underscores
    ('1_0m' is 10m) and more: cpus is a Kubernetes quantity, as memory is, so those are 400s
    naming it."""
    with pytest.raises(InvalidSpecError, match="cpus") as refused:
        build(models, {"gpus": 0, "cpus": cpus})
    assert refused.value.field == "cpus"
    for fine, amount in (("1.5", 1.5), ("500m", 0.5), (" 1 ", 1.0), (1, 1.0), (0.25, 0.25)):
        assert build(models, {"gpus": 0, "cpus": fine}).cpus == amount
