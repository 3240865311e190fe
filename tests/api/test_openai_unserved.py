"""OpenAI's APIs the appliance does not serve (stored responses, Assistants, images, audio,
fine-tuning...) answer the SDK a 404 in OpenAI's envelope that says so and what to call
instead, where they said only "Invalid URL"."""

from __future__ import annotations

import openai
import pytest

from tests.harness import ADMIN_KEY, Appliance


def test_the_sdk_hears_which_openai_apis_are_not_served(api_only: Appliance) -> None:
    oai = openai.OpenAI(base_url=api_only.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as responses:  # served, but none is kept
        oai.responses.retrieve("resp_123")
    said = responses.value.body["message"]  # type: ignore[index]
    assert said.startswith("Invalid URL (GET /v1/responses/resp_123): this appliance keeps no"), (
        said
    )
    assert "POST /v1/responses" in said
    with pytest.raises(openai.NotFoundError) as assistants:
        oai.beta.assistants.list()
    said = assistants.value.body["message"]  # type: ignore[index]
    assert "/v1/chat/completions" in said
    with pytest.raises(openai.NotFoundError) as images:
        oai.images.generate(prompt="a cat", model="m")
    assert "image generation is not available" in images.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as jobs:
        oai.fine_tuning.jobs.list()
    assert "fine-tuning is not available" in jobs.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as near:  # a prefix, not a word's start
        oai.get("/responsesx", cast_to=object)
    assert near.value.body["message"] == "Invalid URL (GET /v1/responsesx)"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as deleted:  # a model is an endpoint here
        oai.models.delete("llama")
    said = deleted.value.body["message"]  # type: ignore[index]
    assert deleted.value.status_code == 405
    assert said.startswith("Method Not Allowed (DELETE /v1/models/llama): a model here is"), said
    assert "DELETE /v1/llm/model-endpoints/{name}" in said
    without_key = openai.OpenAI(base_url=api_only.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):  # the key gate first, as on every route
        without_key.responses.create(model="llama", input="Say hi.")


def test_the_sdk_hears_that_no_chat_completion_is_kept(api_only: Appliance) -> None:
    """OpenAI's stored chat completions (`client.chat.completions.retrieve`, `list`, `update`,
    `delete`, `messages.list`) answer a 404 or 405 that says none is kept, where they said
    only "Invalid URL" or "Method Not Allowed"."""
    oai = openai.OpenAI(base_url=api_only.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    calls = {
        "GET /v1/chat/completions/chatcmpl-1": lambda: oai.chat.completions.retrieve("chatcmpl-1"),
        "GET /v1/chat/completions/chatcmpl-1/messages": lambda: oai.chat.completions.messages.list(
            "chatcmpl-1"
        ),
        "DELETE /v1/chat/completions/chatcmpl-1": lambda: oai.chat.completions.delete("chatcmpl-1"),
        "POST /v1/chat/completions/chatcmpl-1": lambda: oai.chat.completions.update(
            "chatcmpl-1", metadata={"a": "b"}
        ),
        "GET /v1/chat/completions": lambda: oai.chat.completions.list(),
    }
    for said_of, call in calls.items():
        with pytest.raises(openai.APIStatusError) as unkept:
            call()
        said = unkept.value.body["message"]  # type: ignore[index]
        assert f"({said_of}): this appliance keeps no chat completions" in said, said
        assert unkept.value.status_code in (404, 405)
