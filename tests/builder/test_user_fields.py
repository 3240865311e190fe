"""What a non-administrator may pass to a replica: per framework, an allowlist of environment
variables; a priority above 0 is an administrator's; a model path must be a model of the kind
its server loads, so a request that would only crash-loop is a 422 at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.errors import InvalidSpecError
from tests.builder.field_cases import ADMIN, USER, build


@pytest.fixture
def models(tmp_path: Path) -> Path:
    models_dir = tmp_path / "models"
    (models_dir / "hf").mkdir(parents=True)
    (models_dir / "hf" / "config.json").write_text("{}")
    (models_dir / "empty").mkdir()
    (models_dir / "tiny.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    (models_dir / "notes.txt").write_text("not a model")
    return models_dir


LLAMA = {"inference_framework": "llamacpp", "gpus": 0}


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"env": {"VLLM_SERVER_DEV_MODE": "1"}}, "VLLM_SERVER_DEV_MODE"),
        ({"env": {"VLLM_PLUGINS": "evil"}}, "VLLM_PLUGINS"),
        ({**LLAMA, "checkpoint_path": "tiny.gguf", "env": {"LLAMA_ARG_API_KEY": "x"}}, "API_KEY"),
        ({**LLAMA, "checkpoint_path": "tiny.gguf", "env": {"LLAMA_ARG_ENDPOINT_SLOTS": "1"}},
         "LLAMA_ARG_ENDPOINT_SLOTS"),
        ({"priority": 1}, "priority"),
        ({"high_priority": True}, "high_priority"),
        ({"trust_remote_code": True}, "trust_remote_code"),  # runs the repository's code
        # vLLM imports the file named (one of a hub repository's, in the shared cache): its code
        ({"extra_flags": {"--structured-outputs-config": json.dumps(
            {"reasoning_parser_plugin": "/root/.cache/huggingface/hub/x/evil.py"})}},
         "reasoning_parser_plugin"),
        ({"extra_flags": {"--speculative-config": json.dumps(
            {"method": "ngram", "draft": {"tool-parser-plugin": "os"}})}},
         "tool-parser-plugin"),
    ],
)  # fmt: skip
def test_a_user_may_not_set_what_changes_the_server(
    models: Path, fields: dict[str, object], name: str
) -> None:
    with pytest.raises(InvalidSpecError) as refused:
        build(models, fields, USER)
    assert name in refused.value.message


def test_a_user_may_tune_and_an_admin_may_do_more(models: Path) -> None:
    tuned = build(models, {"env": {"VLLM_LOGGING_LEVEL": "DEBUG"}, "priority": -1}, USER)
    assert tuned.env == {"VLLM_LOGGING_LEVEL": "DEBUG"} and tuned.priority == -1
    assert build(models, {"env": {"VLLM_PLUGINS": "x"}, "priority": 5}, ADMIN).priority == 5
    assert build(models, {"trust_remote_code": True}, ADMIN).args["trust_remote_code"] is True
    assert build(models, {"trust_remote_code": False}, USER).args["trust_remote_code"] is False
    with pytest.raises(InvalidSpecError):  # the server's own key: nobody's to set
        build(models, {**LLAMA, "checkpoint_path": "tiny.gguf", "env": {"LLAMA_ARG_API_KEY": "x"}})


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"LLAMA_ARG_THREADS": "-99999999999"}, "a whole number from -1 to 1024"),  # stoi fails
        ({"LLAMA_ARG_THREADS": "two"}, "a whole number"),
        ({"LLAMA_ARG_BATCH": "0"}, "a whole number from 1"),
        ({"LLAMA_ARG_UBATCH": "1e9"}, "a whole number"),
        ({"LLAMA_ARG_FLASH_ATTN": "yes"}, "one of"),
        ({"LLAMA_ARG_CACHE_TYPE_K": "q2_k"}, "q8_0"),
        ({"LLAMA_ARG_EMBEDDINGS": "yes"}, "one of"),  # read as off, without a word
        ({"LLAMA_ARG_POOLING": "max"}, "mean"),
        ({"OMP_NUM_THREADS": "0"}, "a whole number from 1"),
        ({"LLAMA_ARG_N_PARALLEL": "4"}, "per_worker"),  # --parallel wins over it
        ({"LLAMA_ARG_N_GPU_LAYERS": "10"}, "-ngl 999"),
    ],
)
def test_a_tuning_variable_its_server_cannot_use_is_refused_naming_it(
    models: Path, env: dict[str, str], why: str
) -> None:
    """llama-server fails to start on a number it cannot read ("error while handling
    environment variable"), reads a word it does not know as nothing, and lets its command line
    (which the appliance builds) win over its environment: each is a 400 naming the variable,
    for an administrator too, where the replica crash-looped or the setting changed nothing."""
    fields = {**LLAMA, "checkpoint_path": "tiny.gguf", "env": env}
    for caller in (USER, ADMIN):
        with pytest.raises(InvalidSpecError) as refused:
            build(models, fields, caller)
        assert refused.value.field == "env", refused.value.message
        assert next(iter(env)) in refused.value.message and why in refused.value.message


def test_tuning_variables_within_what_their_server_takes_pass(models: Path) -> None:
    env = {
        "LLAMA_ARG_THREADS": "-1",
        "LLAMA_ARG_BATCH": "512",
        "LLAMA_ARG_FLASH_ATTN": "auto",
        "LLAMA_ARG_CACHE_TYPE_K": "q8_0",
        "LLAMA_ARG_EMBEDDINGS": "1",
        "LLAMA_ARG_POOLING": "mean",
    }
    made = build(models, {**LLAMA, "checkpoint_path": "tiny.gguf", "env": env}, USER)
    assert made.env == env
    vllm = {"VLLM_LOGGING_LEVEL": "debug", "VLLM_CPU_KVCACHE_SPACE": "4", "OMP_NUM_THREADS": "2"}
    assert build(models, {"env": vllm}, USER).env == vllm
    with pytest.raises(InvalidSpecError):
        build(models, {"env": {"VLLM_CPU_KVCACHE_SPACE": "4GiB"}}, USER)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"checkpoint_path": "."}, "models directory itself"),
        ({"checkpoint_path": "/models/"}, "models directory itself"),
        ({**LLAMA, "checkpoint_path": "hf"}, "not a GGUF file"),
        ({**LLAMA, "checkpoint_path": "notes.txt"}, "not a GGUF file"),
        ({**LLAMA, "model_name": "empty"}, "not a GGUF file"),
        ({"checkpoint_path": "empty"}, "config.json"),
        ({"checkpoint_path": "notes.txt"}, "config.json"),
        # vLLM 0.32 has no GGUF loader: its replica would crash-loop reading the file as JSON
        ({"checkpoint_path": "tiny.gguf"}, "serve it with llama.cpp"),
    ],
)
def test_a_model_path_must_be_a_model_its_server_loads(
    models: Path, fields: dict[str, object], why: str
) -> None:
    with pytest.raises(InvalidSpecError) as refused:
        build(models, fields)
    assert why in refused.value.message and refused.value.field == "checkpoint_path"


def test_models_of_the_right_kind_pass(models: Path) -> None:
    assert build(models, {"checkpoint_path": "hf"}).model == "/models/hf"
    assert build(models, {**LLAMA, "checkpoint_path": "tiny.gguf"}).model == "/models/tiny.gguf"


def test_a_setting_a_framework_does_not_use_is_refused(models: Path) -> None:
    for fields, field in [
        ({"command": ["sh"]}, "command"),
        ({"port": 9000}, "port"),
        ({**LLAMA, "checkpoint_path": "tiny.gguf", "max_num_seqs": 4}, "max_num_seqs"),
        ({**LLAMA, "checkpoint_path": "tiny.gguf", "extra_flags": {"--x": 1}}, "extra_flags"),
    ]:
        with pytest.raises(InvalidSpecError) as refused:
            build(models, fields)
        assert refused.value.field == field
