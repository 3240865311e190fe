"""LLM Engine v1 formats from and to OpenAI completions (reference/llm-engine.md §2-3)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.errors import BadRequestError
from forwarder import llm_engine


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def completion(framework: str, **fields: Any) -> dict[str, Any]:
    request = {"prompt": "hi", "max_new_tokens": 5, "temperature": 0.0, **fields}
    body = llm_engine.completion_payload(request, "m", stream=False)
    return body | llm_engine.guided_payload(request, framework)


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("guided_json", {"type": "object"}, "json"),
        ("guided_regex", "[0-9]+", "regex"),
        ("guided_choice", ["yes", "no"], "choice"),
        ("guided_grammar", 'root ::= "a"', "grammar"),
    ],
)
def test_guided_fields_become_vllm_structured_outputs(field: str, value: Any, kind: str) -> None:
    body = completion("vllm", **{field: value})
    assert body["structured_outputs"] == {kind: value}
    assert not any(key.startswith("guided_") for key in body)  # vLLM 0.32 would ignore them


def test_guided_fields_become_llama_cpp_schema_and_grammars() -> None:
    assert completion("llamacpp", guided_json={"type": "object"})["json_schema"] == {
        "type": "object"
    }
    grammar = completion("llamacpp", guided_choice=['say "yes"', "no"])["grammar"]
    assert grammar == 'root ::= "say \\"yes\\"" | "no"'
    assert completion("llamacpp", guided_grammar='root ::= "a"')["grammar"] == 'root ::= "a"'


@pytest.mark.parametrize(
    ("framework", "fields", "named"),
    [
        ("vllm", {"guided_json": {}, "guided_choice": ["a"]}, "guided_choice"),
        ("vllm", {"guided_regex": "a", "guided_grammar": "g"}, "guided_grammar"),
        ("llamacpp", {"guided_regex": "[a-z]+"}, "guided_regex"),
        ("custom", {"guided_json": {"type": "object"}}, "guided_json"),
    ],
)
def test_guided_decoding_that_cannot_be_honoured_is_a_400_naming_the_field(
    framework: str, fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(BadRequestError) as refused:
        completion(framework, **fields)
    assert refused.value.field == named and named in refused.value.message


def test_v1_request_becomes_an_openai_completion() -> None:
    body = llm_engine.completion_payload(
        {
            "prompt": "hi",
            "max_new_tokens": 5,
            "temperature": 0.1,
            "stop_sequences": ["."],
            "return_token_log_probs": True,
            "top_k": None,
        },
        "gemma",
        stream=True,
    )
    assert body == {
        "model": "gemma",
        "prompt": "hi",
        "max_tokens": 5,
        "temperature": 0.1,
        "stop": ["."],
        "logprobs": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_sync_response() -> None:
    reply = {
        "choices": [{"text": "Paris", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1},
    }
    assert llm_engine.sync_response(reply, "r1") == {
        "request_id": "r1",
        "output": {"text": "Paris", "num_prompt_tokens": 4, "num_completion_tokens": 1},
    }


def llamacpp_logprobs(*pairs: tuple[str, float]) -> dict[str, Any]:
    """llama.cpp's server's `logprobs` of a completion choice, as its b-series answers (the
    chat format's `content`, with ids, bytes and top_logprobs)."""
    content = [
        {"id": 7, "token": t, "bytes": list(t.encode()), "logprob": v, "top_logprobs": []}
        for t, v in pairs
    ]
    return {"content": content}


def test_sync_response_lists_tokens_in_either_logprobs_format() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 2}
    vllm = {
        "choices": [
            {
                "text": " the sea",
                "logprobs": {"tokens": [" the", " sea"], "token_logprobs": [-1.04, -0.5]},
            }
        ],
        "usage": usage,
    }
    llamacpp = {
        "choices": [
            {"text": " the sea", "logprobs": llamacpp_logprobs((" the", -1.04), (" sea", -0.5))}
        ],
        "usage": usage,
    }
    want = [{"token": " the", "log_prob": -1.04}, {"token": " sea", "log_prob": -0.5}]
    assert llm_engine.sync_response(vllm, "r1")["output"]["tokens"] == want
    assert llm_engine.sync_response(llamacpp, "r1")["output"]["tokens"] == want


def test_stream_events_carry_llamacpp_tokens() -> None:
    """llama.cpp streams one token a chunk, then a last chunk with the finish reason, no
    logprobs and the usage."""
    first = {
        "choices": [
            {"text": " the", "logprobs": llamacpp_logprobs((" the", -0.93)), "finish_reason": None}
        ]
    }
    second = {
        "choices": [
            {
                "text": " limit",
                "logprobs": llamacpp_logprobs((" limit", -0.01)),
                "finish_reason": None,
            }
        ]
    }
    last = {
        "choices": [{"text": "", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2},
    }
    translator = llm_engine.StreamTranslator("r1")
    out = translator.feed(sse(first, second, last) + b"data: [DONE]\n\n") + translator.close()
    events = [json.loads(line[6:])["output"] for line in out.split(b"\n\n") if line]
    assert [e.get("token") for e in events] == [
        {"token": " the", "log_prob": -0.93},
        {"token": " limit", "log_prob": -0.01},
        None,
    ]
    assert events[-1]["finished"] and events[-1]["num_completion_tokens"] == 2


def test_a_vllm_chunk_of_several_tokens_is_an_event_for_each() -> None:
    """vLLM may stream two tokens in one chunk (", the"): LLM Engine's stream has an event a
    token, each with its own `token` and log-probability, where the chunk's one event carried
    the first token's alone and the second's log-probability was lost."""
    first = {
        "choices": [
            {
                "text": " blue",
                "logprobs": {"tokens": [" blue"], "token_logprobs": [-1.5]},
                "finish_reason": None,
            }
        ]
    }
    second = {
        "choices": [
            {
                "text": ", the",
                "logprobs": {"tokens": [",", " the"], "token_logprobs": [-1.1, -0.5]},
                "finish_reason": "length",
            }
        ]
    }
    usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
    translator = llm_engine.StreamTranslator("r1")
    out = translator.feed(sse(first, second, usage) + b"data: [DONE]\n\n") + translator.close()
    events = [json.loads(line[6:])["output"] for line in out.split(b"\n\n") if line]
    assert [(e["text"], e.get("token")) for e in events] == [
        (" blue", {"token": " blue", "log_prob": -1.5}),
        (",", {"token": ",", "log_prob": -1.1}),
        (" the", {"token": " the", "log_prob": -0.5}),
    ]
    assert [e["finished"] for e in events] == [False, False, True]
    assert [e["num_completion_tokens"] for e in events] == [1, 2, 3]


def test_stream_translation_has_no_done_and_finishes_once() -> None:
    chunk = {"choices": [{"text": "a", "finish_reason": None}], "usage": None}
    last = {"choices": [{"text": "", "finish_reason": "length"}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    data = sse(chunk, chunk, last, usage) + b"data: [DONE]\n\n"
    translator = llm_engine.StreamTranslator("r1")
    out = b"".join(translator.feed(data[i : i + 10]) for i in range(0, len(data), 10))
    out += translator.close()
    events = [json.loads(line[6:]) for line in out.split(b"\n\n") if line]
    assert b"[DONE]" not in out
    assert [e["output"]["finished"] for e in events] == [False, False, True]
    assert events[-1]["output"]["num_completion_tokens"] == 2
    assert events[-1]["output"]["num_prompt_tokens"] == 3
    assert all(e["request_id"] == "r1" for e in events)


def test_error_in_band() -> None:
    translator = llm_engine.StreamTranslator("r1")
    out = translator.feed(sse({"error": {"message": "boom", "code": 500}}))
    event = json.loads(out[6:])
    assert event["error"]["status_code"] == 500
    assert event["error"]["content"]["error"] == "boom"


def test_task_wrapping() -> None:
    ok = llm_engine.sync_task_response(200, b'{"x": 1}')
    assert ok["status"] == "SUCCESS" and json.loads(ok["result"]["result"]) == {"x": 1}
    bad = llm_engine.sync_task_response(400, b'{"detail": "no"}')
    assert bad["status"] == "FAILURE" and bad["status_code"] == 400
    assert llm_engine.task_path("vllm", "/predict", {"messages": []}) == "/v1/chat/completions"
    assert llm_engine.task_path("custom", "/predict", {"messages": []}) == "/predict"


@pytest.mark.parametrize("args", [{"max_tokens": "abc"}, {}, [1, 2], None, "text"])
def test_a_task_whose_args_fit_no_route_is_refused_on_openai_replicas(args: Any) -> None:
    for framework in ("vllm", "llamacpp"):
        with pytest.raises(BadRequestError, match="args need prompt") as refused:
            llm_engine.task_path(framework, "/predict", args)
        assert refused.value.field == "args" and "/v1/completions" in refused.value.message
        named = llm_engine.task_path(framework, "/predict", args, "/v1/embeddings")
        assert named == "/v1/embeddings"
    # a custom image takes any args on its own predict route
    assert llm_engine.task_path("custom", "/generate", args) == "/generate"


def test_results_as_string_reads_the_body_then_args_and_takes_it_out_of_args() -> None:
    key = llm_engine.SERIALIZE_KEY
    assert llm_engine.results_as_string(None, {"prompt": "p"}, stream=False) is True
    assert llm_engine.results_as_string(None, {"prompt": "p"}, stream=True) is False
    args: dict[str, Any] = {"prompt": "p", key: False}
    assert llm_engine.results_as_string(None, args, stream=False) is False
    assert args == {"prompt": "p"}  # the replica never sees it
    args = {"prompt": "p", key: False}
    assert llm_engine.results_as_string(True, args, stream=True) is True
    assert args == {"prompt": "p"}
    assert llm_engine.results_as_string(None, [{key: True}], stream=True) is False  # a list
    for given, args in (("yes", {}), (None, {key: 0}), (None, {key: "false"})):
        with pytest.raises(BadRequestError, match="must be true or false") as refused:
            llm_engine.results_as_string(given, args, stream=False)
        assert refused.value.field in (key, f"args.{key}")
    assert llm_engine.task_event({"x": 1}, as_string=True) == llm_engine.task_event('{"x": 1}')
