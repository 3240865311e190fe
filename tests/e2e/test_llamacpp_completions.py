"""OpenAI's `/v1/completions` on a real llama.cpp endpoint, through the official `openai` SDK:
replies in OpenAI's legacy completion shape (log-probabilities, `cmpl-` ids, usage over every
choice, plain and streamed, and the appliance's own accounting reading that figure), and what
llama.cpp's server would silently ignore (`echo`, `suffix`, `best_of`) refused with a 400 on
every entry that reaches it."""

from __future__ import annotations

import re
from collections.abc import Callable

import openai
import pytest

from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.harness import ADMIN_KEY, Appliance

MODEL = "gemma-cmpl"
PROMPT = "The sky is"


@pytest.fixture(scope="module")
def gemma(make_module_appliance: Callable[..., Appliance]) -> Appliance:
    appliance = make_module_appliance()
    client = appliance.client()
    create_gemma(client, MODEL)
    wait_ready(client, MODEL)
    return appliance


@pytest.fixture(scope="module")
def sdk(gemma: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=gemma.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def completion_tokens_counted(appliance: Appliance) -> int:
    """The completion tokens the appliance's accounting holds for the endpoint, all keys."""
    text = appliance.client().get("/metrics").text
    pattern = (
        rf'appliance_tokens_total{{[^}}]*endpoint="{MODEL}"[^}}]*kind="completion"[^}}]*}} (\S+)'
    )
    return sum(int(float(count)) for count in re.findall(pattern, text))


def test_logprobs_come_in_the_legacy_completion_shape(sdk: openai.OpenAI) -> None:
    reply = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    assert reply.id.startswith("cmpl-") and reply.object == "text_completion", reply
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    values = logprobs.token_logprobs
    assert isinstance(values, list) and len(values) == 4, logprobs
    assert all(isinstance(v, float) and v <= 0.0 for v in values), values
    assert logprobs.tokens is not None and "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs) == 4
    assert all(isinstance(top, dict) and 1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    offsets = logprobs.text_offset
    assert offsets is not None and offsets[0] == 0
    assert offsets == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]


def test_a_stream_carries_the_legacy_logprobs_and_ids(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.id.startswith("cmpl-") for c in chunks), chunks
    values: list[float] = []
    offsets: list[int] = []
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.logprobs is not None and choice.logprobs.token_logprobs:
                values += choice.logprobs.token_logprobs
                offsets += choice.logprobs.text_offset or []
    assert len(values) == 4 and all(isinstance(v, float) for v in values), chunks
    assert offsets[0] == 0 and offsets == sorted(offsets), offsets


def test_usage_counts_every_choice_and_so_does_the_accounting(
    sdk: openai.OpenAI, gemma: Appliance
) -> None:
    before = completion_tokens_counted(gemma)
    # ignore_eos (llama.cpp's): each choice runs to max_tokens, so the sum is known
    eos = {"ignore_eos": True}
    reply = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, n=2, extra_body=eos)
    assert len(reply.choices) == 2
    assert all(c.finish_reason == "length" for c in reply.choices), reply
    assert reply.usage is not None and reply.usage.completion_tokens == 10, reply.usage
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 10

    stream = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, n=2, stream=True, logprobs=1, extra_body=eos
    )
    usages = [c.usage for c in stream if c.usage is not None]
    assert len(usages) == 1 and usages[0].completion_tokens == 10, usages
    assert completion_tokens_counted(gemma) - before == 20


def test_what_llamacpp_would_ignore_is_refused_naming_the_field(
    sdk: openai.OpenAI, gemma: Appliance
) -> None:
    asks = (
        ("echo", {"echo": True}),
        ("suffix", {"suffix": "x"}),
        ("best_of", {"best_of": 2}),
    )
    for field, extra in asks:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                sdk.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=2, stream=stream, **extra
                )  # type: ignore[call-overload]
            message = str(refused.value.body)
            assert field in message and "llama.cpp endpoints do not" in message, message
            assert refused.value.param == field, refused.value.body
    # what it honours passes
    fine = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=False, best_of=1)
    assert fine.choices[0].text is not None

    v2 = openai.OpenAI(base_url=gemma.url + "/v2", api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        v2.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=True)

    client = gemma.client()
    endpoint_id = client.get(f"/v1/llm/model-endpoints/{MODEL}").json()["id"]
    args = {"args": {"prompt": PROMPT, "max_tokens": 2, "suffix": "x"}}
    for entry in ("async-tasks", "sync-tasks", "streaming-tasks"):
        reply = client.post(f"/v1/{entry}?model_endpoint_id={endpoint_id}", json=args)
        assert reply.status_code == 400, (entry, reply.text)
        assert "suffix: llama.cpp endpoints do not" in reply.text, reply.text


def test_a_batch_line_asking_for_echo_is_refused_at_submit(sdk: openai.OpenAI) -> None:
    line = (
        '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": '
        f'{{"model": "{MODEL}", "prompt": "{PROMPT}", "max_tokens": 2, "echo": true}}}}\n'
    )
    source = sdk.files.create(file=("lines.jsonl", line.encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.batches.create(
            input_file_id=source.id, endpoint="/v1/completions", completion_window="24h"
        )
    assert "echo: llama.cpp endpoints do not" in str(refused.value.body)
