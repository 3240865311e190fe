"""The command-line contract with vLLM, checked by the real vLLM: every command line the builder
can emit (each accepted field, each framework option, tensor- and pipeline-parallel sets, the
extra flags the allowlist lets through) is parsed and validated by `vllm serve`'s own parser in
the real vLLM image, in one container. A flag vLLM 0.32 does not know fails this test.

The stand-in that plays vLLM where a GPU is faked must never accept what vLLM would not: each
of its options must be one of vLLM's, and it must accept the same command lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from appliance.models import Endpoint
from builder.frameworks import VLLM_CHOICES, VLLM_FLAGS
from builder.policy import VLLM_EXTRA_FLAGS_ALLOWED
from builder.specs import server_command
from tests.builder.field_cases import VLLM_FLAG_CASES, build, extra_flag_values
from tests.harness import VLLM_CPU_IMAGE

HERE = Path(__file__).resolve().parent
STANDIN = HERE.parents[1] / "images" / "vllm-standin" / "server.py"
PARSE_TIMEOUT_S = 300


def standin() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_standin_server", STANDIN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def every_command_line(models: Path) -> dict[str, list[str]]:
    """Each command line the builder emits for a vLLM endpoint, by what it exercises."""
    lines: dict[str, list[str]] = {}

    def add(case: str, endpoint: Endpoint) -> None:
        lines[case] = list(server_command(endpoint)[0])

    for case, (fields, _) in VLLM_FLAG_CASES.items():
        add(case, build(models, fields))
    for gpus in (0, 1, 2, 4, 8):
        add(f"gpus={gpus}", build(models, {"gpus": gpus}))
    add("gpus=8,pp=4", build(models, {"gpus": 8, "pipeline_parallel_size": 4}))
    add("local model", build(models, {"checkpoint_path": "gemma-hf"}))
    for flag, value in extra_flag_values().items():
        add(f"extra {flag}", build(models, {"extra_flags": {flag: value}}))
    add("extra switch off", build(models, {"extra_flags": {"--enable-chunked-prefill": False}}))
    every = {}
    for fields, _ in VLLM_FLAG_CASES.values():
        if "gpus" not in fields and "num_shards" not in fields:
            every.update(fields)
    for alone in ("chat_template_override", "gpu_memory_fraction", "tensor_parallel_size"):
        every.pop(alone, None)  # each needs the others unset, or gpus of 1
    add("every setting at once", build(models, {**every, "gpus": 2}))
    return lines


def test_every_flag_the_builder_knows_is_in_a_command_line_checked_here(models: Path) -> None:
    """A flag added to the table (or the extra-flags allowlist) without a case here would go
    unchecked: each one must appear in a command line the contract test sends to vLLM."""
    emitted = {arg for argv in every_command_line(models).values() for arg in argv}
    flags = {*VLLM_FLAGS.values(), *VLLM_EXTRA_FLAGS_ALLOWED}
    unchecked = sorted(f for f in flags if f not in emitted and "--no-" + f[2:] not in emitted)
    assert unchecked == []


def real_vllm_parse(
    argv: list[list[str]], options: list[str], choices: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Runs tests/images/vllm_parse.py in the real vLLM image (one container for them all)."""
    run = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            "-v",
            f"{HERE / 'vllm_parse.py'}:/vllm_parse.py:ro",
            "--entrypoint",
            "python",
            VLLM_CPU_IMAGE,
            "/vllm_parse.py",
        ],
        input=json.dumps({"argv": argv, "options": options, "choices": list(choices)}),
        capture_output=True,
        text=True,
        timeout=PARSE_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def standin_parse(module: ModuleType, argv: list[str]) -> str | None:
    try:
        module.parse_args(argv)
    except SystemExit:
        return "the stand-in refused it"
    return None


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("contract") / "models"
    (models_dir / "gemma-hf").mkdir(parents=True)
    (models_dir / "gemma-hf" / "config.json").write_text("{}")
    return models_dir


def test_every_command_line_the_builder_emits_is_one_vllm_accepts(
    models: Path, docker_ready: None, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = every_command_line(models)
    fake = standin()
    options = sorted(
        option
        for action in fake.make_parser()._actions
        if not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    )
    chosen = {VLLM_FLAGS[name]: choices for name, choices in VLLM_CHOICES.items()}
    result = real_vllm_parse(list(lines.values()), options, tuple(chosen))
    # the settings the api takes from a list take vLLM's own list
    assert result["choices"] == {flag: sorted(c) for flag, c in chosen.items()}
    refused = {
        case: error for case, error in zip(lines, result["argv"], strict=True) if error is not None
    }
    assert refused == {}, f"vLLM 0.32 refuses these command lines: {refused}"
    assert result["unknown_options"] == [], "the stand-in takes flags vLLM 0.32 does not know"
    with capsys.disabled():  # argparse prints to stderr on a refusal
        standin_refused = [case for case, argv in lines.items() if standin_parse(fake, argv)]
    assert standin_refused == [], "the stand-in refuses command lines vLLM accepts"
