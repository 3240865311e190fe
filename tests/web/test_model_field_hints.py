"""The endpoint form's model field when the file named is not there: the message names the
file that is there when only its ".gguf" was left off, says how to put one there from
the UI (the Models page), not only "copy it there", and, for a Hugging Face id given to
llama.cpp, that llama.cpp serves a GGUF file and hub ids go with vLLM."""

from __future__ import annotations

import html
import re

import httpx

from tests.harness import GEMMA_FILE, Appliance
from tests.web.test_forms_and_sign_in import browser_client, csrf_of


def model_error(client: httpx.Client, model: str) -> str:
    form = client.get("/ui/endpoints/new").text
    body = {"csrf": csrf_of(form), "name": "hinted", "framework": "llamacpp", "model": model}
    reply = client.post("/ui/endpoints/new", data=body)
    assert reply.status_code == 422, reply.status_code
    found = re.search(r'data-error-for="model"[^>]*>(.*?)<', reply.text, re.S)
    assert found is not None, "no message next to the model field"
    return html.unescape(found.group(1)).strip()


def test_a_missing_model_file_says_what_is_there_and_where_to_upload(api_only: Appliance) -> None:
    client = browser_client(api_only)
    stem = GEMMA_FILE.removesuffix(".gguf")
    said = model_error(client, stem)
    assert "does not exist in the models directory" in said, said
    assert f"did you mean {GEMMA_FILE!r}" in said, said
    said = model_error(client, "nothing-like-it.gguf")
    assert "did you mean" not in said and "Models page" in said, said
    assert api_only.client().get("/v1/model-endpoints").json()["model_endpoints"] == []


def test_a_hub_id_for_llama_cpp_says_it_serves_a_gguf_file_and_hub_ids_go_with_vllm(
    api_only: Appliance,
) -> None:
    """google/gemma-3-270m on llama.cpp was told only that the "model file" does not exist."""
    hint = "llama.cpp serves a GGUF file from the models directory"
    said = model_error(browser_client(api_only), "google/gemma-3-270m")
    assert hint in said and "Hugging Face id" in said and "vLLM" in said, said
    body = {
        "name": "hub-on-llama",
        "model_name": "google/gemma-3-270m",
        "inference_framework": "llamacpp",
        "endpoint_type": "streaming",
        "gpus": 0,
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 1,
    }
    reply = api_only.client().post("/v1/llm/model-endpoints", json=body)
    assert reply.status_code == 400, reply.text
    assert hint in reply.text and "inference_framework vllm" in reply.text, reply.text
    said = model_error(browser_client(api_only), "nothing-like-it.gguf")
    assert "Hugging Face" not in said, said  # a file name gets no hub advice
