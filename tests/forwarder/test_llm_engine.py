"""LLM Engine v1 formats from and to OpenAI completions (reference/llm-engine.md §2-3)."""

from __future__ import annotations

import json

from forwarder import llm_engine


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


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
