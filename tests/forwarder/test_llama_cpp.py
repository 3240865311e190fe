"""`forwarder/llama_cpp.py` on llama.cpp's own reply bytes (captured from its server, see
`llama_cpp_replies/README.md`): OpenAI's legacy completion shape out, plain and streamed, the
stream's bytes in any split; and the refusals of what its server would ignore, at admission and
through the HTTP API to an endpoint on its real server (answered 200 before, vLLM's answer now)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response

from api.inference import admission
from appliance.errors import BadRequestError
from forwarder import llama_cpp
from forwarder.llama_cpp import CompletionShape, refusal, shape_for
from forwarder.paths import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from forwarder.table import Target, failed_message
from forwarder.usage import UsageStrip, usage_from_json
from tests.e2e.test_first_slice import create_gemma, wait_ready
from tests.harness import Appliance

REPLIES = Path(__file__).parent / "llama_cpp_replies"


def reply(name: str) -> bytes:
    return (REPLIES / name).read_bytes()


def events(stream: bytes) -> list[Any]:
    """The JSON of each `data:` event of a stream ("[DONE]" as a string)."""
    out: list[Any] = []
    for event in stream.split(b"\n\n"):
        if event.startswith(b"data: "):
            data = event[6:]
            out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


def test_only_llamacpp_completions_and_chats_are_reshaped() -> None:
    assert isinstance(shape_for("llamacpp", b"/v1/completions"), CompletionShape)
    chat = shape_for("llamacpp", b"/v1/chat/completions")
    assert isinstance(chat, CompletionShape) and not chat.legacy
    assert shape_for("llamacpp", b"/v1/embeddings") is None
    assert shape_for("vllm", b"/v1/completions") is None
    assert shape_for("vllm", b"/v1/chat/completions") is None


def test_a_chat_stream_with_n_choices_sends_one_usage_chunk_with_their_sum() -> None:
    """llama.cpp sends a usage chunk for each of the n choices, each its own count; OpenAI
    (and usage accounting) want one, the stream's, last."""
    raw = reply("chat_stream_n2.sse")
    assert sum(1 for c in events(raw) if isinstance(c, dict) and "usage" in c) == 2
    shaped = CompletionShape(legacy=False)
    out = shaped.feed(raw) + shaped.close()
    got = events(out)
    assert got[-1] == "[DONE]"
    with_usage = [c for c in got[:-1] if "usage" in c]
    assert len(with_usage) == 1 and with_usage[0] is got[-2] and with_usage[0]["choices"] == []
    assert with_usage[0]["usage"]["completion_tokens"] == 4  # 2 choices of 2 tokens
    assert usage_from_json(out) == (with_usage[0]["usage"]["prompt_tokens"], 4)
    assert len(got) == len(events(raw)) - 1  # the other usage chunk dropped, nothing else
    assert all(c["id"].startswith("chatcmpl-") for c in got[:-1])  # a chat keeps its shape
    assert all(c["object"] == "chat.completion.chunk" for c in got[:-1])


def test_a_whole_chat_with_n_choices_counts_each_choice() -> None:
    raw = reply("chat_whole_n2.json")
    before = json.loads(raw)
    after = json.loads(CompletionShape(legacy=False).whole(raw))
    assert before["usage"]["completion_tokens"] == 3  # the first choice's alone
    assert after["usage"]["completion_tokens"] == 6
    assert after["usage"]["total_tokens"] == after["usage"]["prompt_tokens"] + 6
    assert after["choices"] == before["choices"] and after["id"] == before["id"]
    assert after["object"] == "chat.completion"


def test_a_whole_reply_gets_the_legacy_logprobs_and_a_completion_id() -> None:
    raw = reply("whole_logprobs.json")
    before = json.loads(raw)
    after = json.loads(CompletionShape().whole(raw))
    assert after["id"] == "cmpl-" + before["id"].removeprefix("chatcmpl-")
    assert after["object"] == "text_completion"
    assert after["usage"] == before["usage"]  # one choice: its own count
    content = before["choices"][0]["logprobs"]["content"]
    logprobs = after["choices"][0]["logprobs"]
    assert logprobs == {
        "text_offset": [0, 1, 3],
        "token_logprobs": [item["logprob"] for item in content],
        "tokens": [",", "\n\n", "I"],
        "top_logprobs": [
            {top["token"]: top["logprob"] for top in item["top_logprobs"]} for item in content
        ],
    }
    assert "".join(logprobs["tokens"]) == after["choices"][0]["text"]
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])


def test_a_whole_reply_counts_the_completion_tokens_of_every_choice() -> None:
    raw = reply("whole_n2.json")
    assert json.loads(raw)["usage"]["completion_tokens"] == 3  # llama.cpp: the first choice's
    shaped = CompletionShape().whole(raw)
    usage = json.loads(shaped)["usage"]
    assert usage["completion_tokens"] == 6 and usage["total_tokens"] == 8
    assert usage_from_json(shaped) == (2, 6)  # what the accounting reads


def test_a_body_that_is_not_a_completion_passes_untouched() -> None:
    for body in (b"not json", b"[1]", b'{"error": {"code": 500}}'):
        assert CompletionShape().whole(body) == body


def test_a_stream_is_reshaped_event_by_event_with_its_usage_summed_once() -> None:
    raw = reply("stream_n2.sse")
    shaped = CompletionShape()
    out = shaped.feed(raw) + shaped.close()
    got = events(out)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert len(chunks) == len(events(raw))  # one event out for each in, and the usage chunk
    assert all(c["id"].startswith("cmpl-") for c in chunks)
    with_usage = [c for c in chunks if "usage" in c]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1]  # its own chunk, last
    assert with_usage[0]["choices"] == []
    assert with_usage[0]["usage"]["completion_tokens"] == 4  # 2 choices of 2 tokens
    assert with_usage[0]["usage"]["total_tokens"] == with_usage[0]["usage"]["prompt_tokens"] + 4
    assert usage_from_json(out) == (2, 4)
    for index in (0, 1):
        tokens: list[str] = []
        offsets: list[int] = []
        for chunk in chunks[:-1]:
            choice = chunk["choices"][0]
            if choice["index"] == index and choice["logprobs"] is not None:
                logprobs = choice["logprobs"]
                assert set(logprobs) == {"text_offset", "token_logprobs", "tokens", "top_logprobs"}
                assert all(isinstance(v, float) for v in logprobs["token_logprobs"])
                assert all(isinstance(top, dict) for top in logprobs["top_logprobs"])
                tokens += logprobs["tokens"]
                offsets += logprobs["text_offset"]
        assert len(tokens) == 2 and offsets == [0, len(tokens[0])]


def test_a_completion_streams_usage_in_a_chunk_of_its_own_as_openai_does() -> None:
    """llama.cpp's server puts a completion stream's usage on its finishing chunk, asked for or
    not; OpenAI and vLLM send it in a chunk of its own (`choices: []`) only when the request
    asks (`stream_options.include_usage`). Reshaped so, a client that did not ask (the
    appliance asked on its behalf) gets no usage at all, and one that asked gets OpenAI's."""
    shaped = CompletionShape()
    out = shaped.feed(reply("stream_n2.sse")) + shaped.close()
    chunks = events(out)[:-1]
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 2 and not any("usage" in c for c in finishing)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "text_completion"
    assert usage_chunk["id"] == chunks[0]["id"] and usage_chunk["model"] == chunks[0]["model"]
    strip = UsageStrip()
    unasked = strip.feed(out) + strip.close()
    assert b'"usage"' not in unasked and events(unasked)[-1] == "[DONE]"
    assert len(events(unasked)) == len(events(out)) - 1


def test_a_chat_stream_opens_its_choices_in_order_for_the_sdks_stream_helper() -> None:
    """llama.cpp's server may send choice 1 before choice 0 (`n` > 1): OpenAI's SDK stream
    helper (`client.chat.completions.stream`) takes a choice's first chunk for its place in a
    list, and failed with "IndexError: list assignment index out of range". Each choice not yet
    seen below the one a chunk carries is opened first, with an empty delta, as OpenAI's and
    vLLM's streams open them in order; the text of each choice is unchanged."""
    raw = reply("chat_stream_n2.sse")
    assert events(raw)[0]["choices"][0]["index"] == 1  # as the server sent it
    body = b'{"messages": [{"role": "user", "content": "Hello"}], "n": 2, "stream": true}'
    shaped = shape_for("llamacpp", b"/v1/chat/completions", body)
    assert shaped is not None
    out = shaped.feed(raw) + shaped.close()
    chunks = [e for e in events(out) if e != "[DONE]"]
    firsts = [c["choices"][0]["index"] for c in chunks if c["choices"]]
    assert firsts[0] == 0 and sorted(set(firsts), key=firsts.index) == [0, 1]
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.current_completion_snapshot  # whole: both choices ran to max_tokens
    texts = {0: "", 1: ""}
    for chunk in events(raw):
        for choice in chunk["choices"] if isinstance(chunk, dict) else ():
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert [c.message.content or "" for c in final.choices] == [texts[0], texts[1]]
    assert [c.message.role for c in final.choices] == ["assistant", "assistant"]


@pytest.mark.parametrize("size", [1, 7, 100, 1000])
@pytest.mark.parametrize("name", ["stream_n2.sse", "chat_stream_n2.sse"])
def test_a_stream_split_anywhere_comes_out_the_same(size: int, name: str) -> None:
    raw = reply(name)
    legacy = not name.startswith("chat")
    whole = CompletionShape(legacy=legacy)
    expected = whole.feed(raw) + whole.close()
    shaped = CompletionShape(legacy=legacy)
    pieces = [shaped.feed(raw[at : at + size]) for at in range(0, len(raw), size)]
    assert b"".join(pieces) + shaped.close() == expected
    assert b"".join(pieces[:-1])  # events go out as they complete, not at the end


def test_comments_and_errors_pass_and_a_held_chunk_is_not_lost() -> None:
    shaped = CompletionShape()
    final = (
        b'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],'
        b'"object":"text_completion","id":"chatcmpl-x","usage":{"completion_tokens":2,'
        b'"prompt_tokens":3,"total_tokens":5}}\n\n'
    )
    error = b'data: {"error":{"code":500,"message":"boom"}}\n\n'
    out = shaped.feed(final + b": ping\n\n" + error) + shaped.close()
    assert out.startswith(b": ping\n\n") and out.endswith(error)
    assert usage_from_json(out) == (3, 2)
    cut = CompletionShape()
    assert usage_from_json(cut.feed(final) + cut.close()) == (3, 2)  # no [DONE]: still sent


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"suffix": ""}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 0.0}, "max_tokens"),
        # read as 32 bits: 4294967298 tokens would be 2, silently
        ({"max_tokens": 2**32 + 2}, "max_tokens"),
        ({"max_tokens": float(2**31)}, "max_tokens"),
        ({"n_predict": 2**32}, "n_predict"),
        # its server constrains chats alone with it (vLLM's completions honour it)
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
    ],
)
def test_what_llamacpp_ignores_is_refused_naming_the_field(
    payload: dict[str, Any], field: str
) -> None:
    refused = refusal({"model": "m", "prompt": "p", **payload})
    assert isinstance(refused, BadRequestError) and refused.field == field
    assert refused.message.startswith(f"{field}: llama.cpp endpoints do not")


def test_what_it_honours_passes() -> None:
    for payload in (
        {},
        {"echo": False},
        {"suffix": None},
        {"best_of": 1},
        {"n": 2},
        {"max_tokens": 2**31 - 1},
        {"n_predict": -1},
        {"response_format": {"type": "text"}},
        {"response_format": None},
    ):
        assert refusal({"model": "m", "prompt": "p", **payload}) is None


# What the llama.cpp server of the default image prints when its GGUF file will not load: each
# line led by its time and level (`E` an error) and often a module, as the real image does
BAD_GGUF_TAIL = """replica crashed 3 times; last: container exited with code 1
warn: LLAMA_ARG_HOST environment variable is set, but will be overwritten by command line argument --host
0.00.002.754 I srv  llama_server: initializing ...
0.00.010.281 I srv    load_model: loading model '/models/bad.gguf'
0.00.010.475 E gguf_init_from_reader: this GGUF file is version 201773982 but this software only supports up to version 3
0.00.010.530 E gguf_init_from_reader: failed to read header
0.00.010.760 E llama_model_load: error loading model: llama_model_loader: failed to load model from /models/bad.gguf
0.00.010.789 E llama_model_load_from_file_impl: failed to load model
0.00.013.492 E srv    load_model: failed to load model, '/models/bad.gguf'
0.00.013.591 I srv    operator(): operator(): cleaning up before exit...
0.00.014.147 E srv  llama_server: exiting due to model loading error"""  # noqa: E501


def llama_target(name: str, status: str, reason: str = "") -> Target:
    """A llama.cpp endpoint in the routing table, with no replica."""
    return Target(
        endpoint_id="end_1",
        name=name,
        owner="t",
        public=False,
        framework=llama_cpp.FRAMEWORK,
        endpoint_type="streaming",
        status=status,
        replicas=(),
        status_reason=reason,
    )


def test_a_crashed_llama_cpp_replica_is_refused_naming_its_error_line() -> None:
    """A request to a llama.cpp endpoint whose replica crash-looped hears the log line that
    names the error, as it does for vLLM, though llama.cpp leads each line with its time and
    level."""
    target = llama_target("broken", "UPDATE_FAILED", BAD_GGUF_TAIL)
    assert failed_message(target) == (
        "endpoint 'broken' failed to start: replica crashed 3 times; last: container exited "
        "with code 1 (llama_model_load: error loading model: llama_model_loader: failed to load "
        "model from /models/bad.gguf); fix it (PUT /v1/model-endpoints/end_1) or restart it "
        "(POST /v1/model-endpoints/end_1/restart)"
    )


@pytest.mark.parametrize("messages", [[], None, "hi"])
def test_a_chat_without_messages_to_llamacpp_is_refused(messages: Any) -> None:
    """OpenAI (and vLLM) refuse a chat with no message; llama.cpp's server answers one with
    text made from nothing, a 200: every entry refuses it before the replica (400, naming
    `messages`)."""
    target = llama_target("m", "READY")
    body = {"model": "m"} if messages is None else {"model": "m", "messages": messages}
    with pytest.raises(BadRequestError) as refused:
        admission.refuse_unfit(target, CHAT, body)
    assert refused.value.field == "messages"
    assert refused.value.message == "messages: a chat needs a list of at least one message"
    admission.refuse_unfit(target, CHAT, {"model": "m", "messages": [{"role": "user"}]})


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"content": "hi"}, "messages[1].role"),
        ({"role": 5, "content": "hi"}, "messages[1].role"),
        ({**USER, "name": None}, "messages[1].name"),
        (
            {"role": "assistant", "content": "x", "reasoning_content": 5},
            "messages[1].reasoning_content",
        ),
        ({**USER, "tool_calls": 5}, "messages[1].tool_calls"),
        ({"role": "assistant", "tool_calls": [{"id": "1"}]}, "messages[1].tool_calls"),
        ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "messages[1].tool_calls"),
        (
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": 5}}]},
            "messages[1].tool_calls",
        ),
        (
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            "messages[1].tool_calls",
        ),
        ({"role": "user", "content": [{"type": "text"}]}, "messages[1].content[0].text"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[1].content[0].text"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
            "messages[1].content[0]",
        ),
        (
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]},
            "messages[1].content[1]",
        ),
    ],
)
def test_a_chat_message_llamacpp_fails_on_is_refused_naming_its_field(
    message: dict[str, Any], field: str
) -> None:
    """llama.cpp's server answers these (and malformed `tools`) with a 500 ("Failed to parse
    messages", "image input is not supported"), where OpenAI and vLLM answer 400: every entry
    refuses them before the replica with a 400 naming the field."""
    target = llama_target("m", "READY")
    body = {"model": "m", "messages": [USER, message]}
    with pytest.raises(BadRequestError) as refused:
        admission.refuse_unfit(target, CHAT, body)
    assert refused.value.field == field, refused.value.message
    assert refused.value.message.startswith(field), refused.value.message
    nameless = [{"type": "function", "function": {}}]
    undescribed = [{"type": "function", "function": {"name": "f", "description": None}}]
    for tools in (5, [5], nameless, [{"function": {"name": "f"}}], undescribed):
        with pytest.raises(BadRequestError) as refused:
            admission.refuse_unfit(target, CHAT, {"model": "m", "messages": [USER], "tools": tools})
        assert refused.value.field == "tools", refused.value.message
    call = {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    fine = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    parts = [{"type": "text", "text": "a"}]
    fine.append({"role": "user", "content": parts, "name": "n"})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    admission.refuse_unfit(target, CHAT, {"model": "m", "messages": fine, "tools": tools})
    tools[0]["function"]["description"] = "says f"
    admission.refuse_unfit(target, CHAT, {"model": "m", "messages": fine, "tools": tools})


@pytest.mark.parametrize("dimensions", [8, 640, "8"])
def test_an_embeddings_request_asking_for_dimensions_is_refused_by_llamacpp(
    dimensions: object,
) -> None:
    """llama.cpp's server ignores `dimensions` and answers vectors of the model's own size, so a
    client sizing its index by what it asked would be told nothing: every entry refuses it
    (400 naming `dimensions`); an embeddings request without it passes."""
    target = llama_target("m", "READY")
    with pytest.raises(BadRequestError) as refused:
        admission.refuse_unfit(
            target, EMBEDDINGS, {"model": "m", "input": "hi", "dimensions": dimensions}
        )
    assert refused.value.field == "dimensions", refused.value.message
    assert refused.value.message.startswith("dimensions: llama.cpp endpoints do not")
    admission.refuse_unfit(target, EMBEDDINGS, {"model": "m", "input": "hi"})
    admission.refuse_unfit(target, EMBEDDINGS, {"model": "m", "input": "hi", "dimensions": None})


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_chat_asking_for_no_token_is_refused_by_llamacpp(field: str) -> None:
    """llama.cpp's server answers `max_tokens: 0` with a token all the same, where vLLM (and
    OpenAI's chat) refuse it: every entry refuses it (400 naming the field); 1 passes."""
    target = llama_target("m", "READY")
    with pytest.raises(BadRequestError) as refused:
        admission.refuse_unfit(target, CHAT, {"model": "m", "messages": [USER], field: 0})
    assert refused.value.field == field, refused.value.message
    assert refused.value.message.startswith(f"{field}: llama.cpp endpoints do not")
    admission.refuse_unfit(target, CHAT, {"model": "m", "messages": [USER], field: 1})


def test_a_list_of_prompts_is_refused_by_llamacpp_whose_usage_counts_the_first() -> None:
    """llama.cpp's server answers every prompt of a list but reports the first one's usage
    alone (`prompt_tokens` 2 for ["a", "one two three four five six seven"], where vLLM
    reports 10): the others would be served uncounted, so such a request is a 400 naming
    `prompt`. One prompt, as a text, a list of one, or token ids, is served."""
    target = llama_target("g", "READY")
    for prompt in (["a", "one two three"], [[1, 2], [3, 4]]):
        with pytest.raises(BadRequestError) as refused:
            admission.refuse_unfit(target, COMPLETIONS, {"model": "g", "prompt": prompt})
        assert refused.value.field == "prompt" and "one prompt per request" in str(refused.value)
    for prompt in ("a", ["a"], [1, 2, 3], [[1, 2, 3]]):
        admission.refuse_unfit(target, COMPLETIONS, {"model": "g", "prompt": prompt})


def test_a_responses_stream_gets_what_openais_sdk_assembles_it_from() -> None:
    """llama.cpp's Responses API events lack `sequence_number`, `output_index`,
    `content_index` and the first response's `output`: OpenAI's SDK (`responses.stream`)
    fails on them. Each event gets what it lacks, in any split of the bytes; the usage and the
    text are the server's."""
    raw = reply("responses_stream.sse")
    for size in (1, 7, len(raw)):
        shape = shape_for("llamacpp", b"/v1/responses")
        assert shape is not None
        out = b"".join(shape.feed(raw[i : i + size]) for i in range(0, len(raw), size))
        out += shape.close()
        blocks = [b for b in out.split(b"\n\n") if b]
        assert [b.split(b"\n")[0] for b in blocks] == [
            b for b in raw.split(b"\n") if b.startswith(b"event: ")
        ]
        sent = [json.loads(b.split(b"\ndata: ", 1)[1]) for b in blocks]
        assert [e["sequence_number"] for e in sent] == list(range(len(sent)))
        assert sent[0]["response"]["output"] == []
        for event in sent:
            if "item_id" in event or "item" in event:
                assert event["output_index"] == 0, event
            if event["type"].startswith(("response.output_text.", "response.content_part.")):
                assert event["content_index"] == 0, event
        deltas = "".join(e["delta"] for e in sent if e["type"] == "response.output_text.delta")
        done = [e for e in sent if e["type"] == "response.output_text.done"]
        assert done and deltas == done[0]["text"]
        assert usage_from_json(out) == usage_from_json(raw) is not None
    assert shape_for("vllm", b"/v1/responses") is None  # vLLM's are OpenAI's already


def test_a_response_carries_what_openais_sdk_requires_and_echoes_the_request() -> None:
    """llama.cpp's response object lacks `tools`, `tool_choice` and `parallel_tool_calls`,
    which OpenAI's SDK declares required (`response.tools` was None, not a list), and echoes
    none of the request (`instructions`, `metadata`, `max_output_tokens`...), where OpenAI's and
    vLLM's do: each is filled from the request, or OpenAI's default, whole and streamed."""
    request = {
        "model": "m",
        "input": "hi",
        "instructions": "be brief",
        "metadata": {"team": "a"},
        "max_output_tokens": 50,
        "temperature": 0.5,
        "tools": [{"type": "function", "name": "f", "parameters": {}}],
    }
    whole = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "m",
        "status": "completed",
        "output": [],
        "usage": {
            "input_tokens": 1,
            "output_tokens": 2,
            "total_tokens": 3,
            "input_tokens_details": {"cached_tokens": 0},
        },
    }
    with pytest.raises(ValueError):  # as the server sends it
        Response.model_validate(whole)
    shape = shape_for("llamacpp", b"/v1/responses", json.dumps(request).encode())
    assert shape is not None
    mended = Response.model_validate(json.loads(shape.whole(json.dumps(whole).encode())))
    assert [t.name for t in mended.tools] == ["f"]  # type: ignore[union-attr]
    assert mended.tool_choice == "auto" and mended.parallel_tool_calls is True
    assert mended.instructions == "be brief" and mended.metadata == {"team": "a"}
    assert mended.max_output_tokens == 50 and mended.temperature == 0.5
    bare = shape_for("llamacpp", b"/v1/responses", b'{"model": "m", "input": "hi"}')
    assert bare is not None
    plain = Response.model_validate(json.loads(bare.whole(json.dumps(whole).encode())))
    assert plain.tools == [] and plain.metadata is None and plain.instructions is None
    stream = shape_for("llamacpp", b"/v1/responses", json.dumps(request).encode())
    assert stream is not None
    raw = reply("responses_stream.sse")
    out = stream.feed(raw) + stream.close()
    for block in (b for b in out.split(b"\n\n") if b):
        event = json.loads(block.split(b"\ndata: ", 1)[1])
        if "response" in event:  # the last whole, as the SDK reads it
            assert event["response"]["metadata"] == {"team": "a"}, event
            if event["type"] == "response.completed":
                Response.model_validate(event["response"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (  # a 500 from its server: it reads no image
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "d"}]}]},
            "input[0].content[0]",
        ),
        ({"input": "hi", "tools": [{"type": "function"}]}, "tools[0].name"),  # a 500 too
        (
            {"input": "hi", "tools": [{"type": "function", "name": "f", "description": None}]},
            "tools[0].description",
        ),
        (  # ignored: free text comes back
            {"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}}}},
            "text.format",
        ),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),  # it makes one
        # what its server fails on with a 500: text that is no string, an image anywhere
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": None}]}]},
            "input[0].content[0].text",
        ),
        (
            {
                "input": [
                    {
                        "type": "function_call_output",
                        "call_id": "c",
                        "output": [{"type": "input_image", "image_url": "data:image/png;,"}],
                    }
                ]
            },
            "input[0].output[0]",
        ),
        # log-probabilities: its server gives a response none (an empty list), and answers
        # `top_logprobs` alone with a 400 asking for `logprobs`, which the API has not
        ({"input": "hi", "top_logprobs": 2}, "top_logprobs"),
        ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
        # several responses: a list of them, not the API's shape, counted for the last alone
        ({"input": "hi", "n": 3}, "n"),
        ({"input": "hi", "n_cmpl": 2.0}, "n_cmpl"),
    ],
)
def test_a_response_llamacpp_would_fail_on_or_ignore_is_refused_naming_it(
    body: dict[str, Any], field: str
) -> None:
    refused = llama_cpp.responses_refusal(body)
    assert refused is not None and refused.field == field, refused
    fine = {"input": "hi", "tools": [{"type": "function", "name": "f"}], "text": {}}
    assert llama_cpp.responses_refusal(fine | {"text": {"format": {"type": "text"}}}) is None
    assert llama_cpp.responses_refusal(fine | {"n": 1}) is None
    assert llama_cpp.responses_refusal(fine | {"top_logprobs": 0, "include": []}) is None


def test_a_response_cut_at_its_limit_says_incomplete() -> None:
    """llama.cpp's server says `completed` of a response that stopped at `max_output_tokens`
    (it reports no finish reason there); OpenAI and vLLM say `incomplete`, with the reason,
    which is how a client learns its text was cut. The captured stream asked for 3 tokens and
    made 3; a response that stopped before its limit, or had none, stays completed."""
    raw = reply("responses_stream.sse")
    made = usage_from_json(raw)
    assert made is not None and made[1] == 3

    def last(limit: bytes) -> dict[str, Any]:
        shape = shape_for("llamacpp", b"/v1/responses", limit)
        assert shape is not None
        out = shape.feed(raw) + shape.close()
        done = [b for b in out.split(b"\n\n") if b.startswith(b"event: response.completed")]
        response: dict[str, Any] = json.loads(done[0].split(b"\ndata: ", 1)[1])["response"]
        return response

    cut = last(b'{"input": "x", "max_output_tokens": 3}')
    assert (cut["status"], cut["incomplete_details"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
    )
    for limit in (b'{"input": "x", "max_output_tokens": 4}', b'{"input": "x"}', b""):
        assert last(limit)["status"] == "completed", limit
    whole = {"status": "completed", "output": [], "usage": {"input_tokens": 2, "output_tokens": 5}}
    shape = shape_for("llamacpp", b"/v1/responses", b'{"max_output_tokens": 5.0}')
    assert shape is not None
    assert json.loads(shape.whole(json.dumps(whole).encode()))["status"] == "incomplete"
    kept = json.dumps(whole | {"usage": {"output_tokens": 2}}).encode()
    assert json.loads(shape.whole(kept))["status"] == "completed"  # under its limit


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            CHAT,
            {"messages": [USER], "tool_choice": {"type": "function", "function": {"name": "f"}}},
        ),
        (RESPONSES, {"input": "hi", "tool_choice": {"type": "function", "name": "f"}}),
    ],
)
def test_a_named_tool_choice_llamacpp_reads_as_auto_is_refused(path: str, body: Any) -> None:
    """llama.cpp's server reads `tool_choice` as a string alone ("auto", "none", "required"):
    an object naming the function to call was taken for "auto" (its log: "Wrong type supplied
    for parameter 'tool_choice', using default value"), so the model was free not to call it."""
    target = llama_target("m", "READY")
    tools = (
        [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        if path == CHAT
        else [{"type": "function", "name": "f"}]
    )
    with pytest.raises(BadRequestError) as refused:
        admission.refuse_unfit(target, path, {"model": "m", "tools": tools, **body})
    assert refused.value.field == "tool_choice", refused.value.message
    assert '"required"' in refused.value.message, refused.value.message
    for choice in ("auto", "none", "required"):
        admission.refuse_unfit(
            target, path, {"model": "m", "tools": tools, **body} | {"tool_choice": choice}
        )


ON_A_STREAM_ALONE = (
    "stream_options: stream options apply to a stream alone: send `stream: true` with them, "
    "or leave `stream_options` out"
)
OPTIONS = {"include_usage": True}


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize("stream", [{}, {"stream": False}, {"stream": None}])
def test_stream_options_without_a_stream_are_refused_by_llamacpp_as_by_vllm(
    path: str, stream: dict[str, Any]
) -> None:
    """vLLM (0.32's `validate_stream_options`) and OpenAI refuse `stream_options` on a request
    that does not stream; llama.cpp's server answered it, the options unread. Every entry
    refuses it (`admission.refuse_unfit`); an empty or null one, or one on a stream, passes, as
    vLLM lets them."""
    target = llama_target("m", "READY")
    body = {"model": "m", "max_tokens": 4, **stream}
    body |= {"messages": [USER]} if path == CHAT else {"prompt": "hi"}
    with pytest.raises(BadRequestError) as refused:
        admission.refuse_unfit(target, path, body | {"stream_options": OPTIONS})
    assert refused.value.field == "stream_options"
    assert refused.value.message == ON_A_STREAM_ALONE
    for fine in ({"stream_options": {}}, {"stream_options": None}, {}):
        admission.refuse_unfit(target, path, body | fine)
    admission.refuse_unfit(target, path, body | {"stream": True, "stream_options": OPTIONS})


@pytest.fixture(scope="module")
def gemma(make_module_appliance: Callable[..., Appliance]) -> Appliance:
    """An appliance serving Gemma on llama.cpp's real server."""
    appliance = make_module_appliance()
    client = appliance.client()
    create_gemma(client, "gemma-llama")
    wait_ready(client, "gemma-llama")
    return appliance


@pytest.mark.parametrize(
    ("path", "ask"),
    [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ],
)
def test_a_llamacpp_endpoint_answers_stream_options_without_a_stream_as_vllm_does(
    gemma: Appliance, path: str, ask: dict[str, Any]
) -> None:
    """The same request gets vLLM's answer from a llama.cpp endpoint: 400 naming
    `stream_options` (its server answered 200, the options unread); with `stream: true` they
    are honoured (the stream ends with its usage)."""
    client = gemma.client()
    body = {"model": "gemma-llama", "max_tokens": 2, **ask, "stream_options": OPTIONS}
    for stream in ({}, {"stream": False}):
        refused = client.post(path, json=body | stream)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "stream_options", error
        assert error["message"] == ON_A_STREAM_ALONE, error
    with client.stream("POST", path, json=body | {"stream": True}) as streamed:
        assert streamed.status_code == 200
        chunks = [line for line in streamed.iter_lines() if line.startswith("data: {")]
    assert '"usage"' in chunks[-1], chunks[-1]
    whole = client.post(path, json={k: v for k, v in body.items() if k != "stream_options"})
    assert whole.status_code == 200, whole.text


def test_a_llamacpp_completion_asking_for_a_response_format_is_refused(gemma: Appliance) -> None:
    """llama.cpp's server constrains chats alone with `response_format`: a completion asking
    for JSON got free text (200), where vLLM's completions honour it. Refused, naming it and
    pointing to the chat, which honours it; plain text passes."""
    client = gemma.client()
    body = {"model": "gemma-llama", "prompt": "A colour:", "max_tokens": 8, "temperature": 0}
    schema = {"type": "object", "properties": {"c": {"enum": ["red"]}}, "required": ["c"]}
    form = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
    refused = client.post("/v1/completions", json=body | {"response_format": form})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "response_format", error
    assert "use chat completions with `response_format`" in error["message"], error
    plain = client.post("/v1/completions", json=body | {"response_format": {"type": "text"}})
    assert plain.status_code == 200, plain.text
    chat = {"model": "gemma-llama", "messages": [{"role": "user", "content": "A colour"}]}
    shaped = client.post(
        "/v1/chat/completions",
        json=chat | {"max_tokens": 48, "temperature": 0, "response_format": form},
    )
    assert shaped.status_code == 200, shaped.text
    assert json.loads(shaped.json()["choices"][0]["message"]["content"]) == {"c": "red"}
