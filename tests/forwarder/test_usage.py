"""Usage taken from reply bytes without changing them: JSON bodies, streams, the ledger."""

from __future__ import annotations

import json

from forwarder.usage import (
    Ledger,
    StreamUsage,
    UsageStrip,
    ask_usage,
    token_mark,
    usage_from_json,
)


def test_usage_from_a_json_body() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert usage_from_json(body.encode()) == (7, 3)
    assert usage_from_json(b'{"choices": []}') is None
    assert usage_from_json(b'{"usage": null}') is None
    # details before the counts (a nested object), counts spread out, a later null usage
    nested = b'{"usage" : {"prompt_tokens_details": {"cached_tokens": 1}, "total_tokens": 9,\n'
    nested += b'"completion_tokens" :4, "prompt_tokens":\t5}, "x": {"usage": null}}'
    assert usage_from_json(nested) == (5, 4)
    assert usage_from_json(b'{"usage": {"prompt_tokens": null, "completion_tokens": 2}}') is None


def test_an_embeddings_reply_counts_its_prompt_tokens() -> None:
    """OpenAI's embeddings usage has no `completion_tokens` (llama.cpp's server sends it first,
    before the vectors): its prompt tokens are counted all the same, with no completion."""
    vectors = [{"object": "embedding", "index": 0, "embedding": [0.25] * 640}]
    first = {"model": "e", "object": "list", "usage": {"prompt_tokens": 3, "total_tokens": 3}}
    assert usage_from_json(json.dumps({**first, "data": vectors}).encode()) == (3, 0)
    last = {"object": "list", "data": vectors, "usage": {"prompt_tokens": 2, "total_tokens": 2}}
    assert usage_from_json(json.dumps(last).encode()) == (2, 0)


def test_usage_from_the_last_chunks_of_a_stream() -> None:
    events = [{"choices": [{"delta": {"content": f"t{i}"}}], "usage": None} for i in range(20)]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 20}})
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    data += b"data: [DONE]\n\n"
    watch = StreamUsage()
    for i in range(0, len(data), 37):  # chunk boundaries fall anywhere
        watch.feed(data[i : i + 37])
    assert watch.result() == (5, 20)


def test_a_responses_usage_counts_by_that_apis_names() -> None:
    """The Responses API names its counts `input_tokens` and `output_tokens`, vLLM with their
    details between them, llama.cpp with its details last; a stream's usage is in its last
    event, `response.completed`, inside the whole response (its `response.created` has none)."""
    vllm = {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": []},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 17,
    }
    reply = {"id": "resp_1", "output": [{"content": [{"text": "x" * 3000}]}], "usage": vllm}
    assert usage_from_json(json.dumps(reply | {"user": None}).encode()) == (11, 6)
    llama = {"input_tokens": 27, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 0}}
    assert usage_from_json(json.dumps({"output": [], "usage": llama}).encode()) == (27, 5)
    created = {"type": "response.created", "response": {"output": [], "usage": None}}
    deltas = [{"type": "response.output_text.delta", "delta": f"t{i}"} for i in range(20)]
    done = {"type": "response.completed", "response": reply, "sequence_number": 22}
    data = b"".join(
        f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in [created, *deltas, done]
    )
    watch = StreamUsage()
    for i in range(0, len(data), 1024):
        watch.feed(data[i : i + 1024])
    assert watch.result() == (11, 6)


def sse(events: list[dict[str, object]], *, named: bool = False) -> list[bytes]:
    """Each event as a replica writes it (`named`: with its `event:` line, as the Responses
    API's)."""
    head = [f"event: {e['type']}\n".encode() if named else b"" for e in events]
    bodies = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events]
    return [h + body for h, body in zip(head, bodies, strict=True)]


def test_a_stream_cut_short_counts_the_token_events_its_client_was_sent() -> None:
    """vLLM's chat stream, one token an event: cut after 6 events, it counts 6 completion
    tokens and its prompt estimated from the request's size (4 bytes a token); a text that
    looks like SSE counts no more (its line breaks are escaped). Read to its end, it counts
    its usage chunk's figures alone."""
    role = {"choices": [{"delta": {"role": "assistant", "content": ""}}], "usage": None}
    tokens = [{"choices": [{"delta": {"content": f"t{i}"}}], "usage": None} for i in range(20)]
    tokens[3] = {"choices": [{"delta": {"content": "data: x\n\ndata: "}}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 20}}
    events = [*sse([role, *tokens, usage]), b"data: [DONE]\n\n"]
    cut = StreamUsage(mark=token_mark("vllm", b"/v1/chat/completions"))
    for event in events[:6]:
        cut.feed(event)
    assert cut.result() is None
    assert cut.counted(401) == (100, 6)
    whole = StreamUsage(mark=token_mark("llamacpp", b"/v1/completions"))
    for event in events:
        whole.feed(event)
    assert whole.counted(401) == (9, 20)


def test_a_responses_stream_cut_short_counts_its_delta_events() -> None:
    """A Responses API stream counts its delta events alone (not `response.created` and the
    other events around them); a custom image's stream is no token stream: none."""
    created = {"type": "response.created", "response": {"output": [], "usage": None}}
    deltas = [{"type": "response.output_text.delta", "delta": f"t{i}"} for i in range(5)]
    deltas[1]["delta"] = 'not.delta" either'
    reasoning = {"type": "response.reasoning_text.delta", "delta": "r"}
    events = sse([created, reasoning, *deltas], named=True)
    watch = StreamUsage(mark=token_mark("vllm", b"/v1/responses"))
    custom = StreamUsage(mark=token_mark("custom", b"/v1/chat/completions"))
    for event in events:
        watch.feed(event)
        custom.feed(event)
    assert watch.counted(80) == (20, 6)
    assert custom.counted(80) is None
    assert StreamUsage(mark=token_mark("vllm", b"/v1/responses")).counted(80) is None  # no event


def test_a_stream_asks_for_its_usage_and_the_client_gets_it_only_if_it_asked() -> None:
    payload: dict[str, object] = {"stream": True}
    assert ask_usage(payload) and payload["stream_options"] == {"include_usage": True}
    kept = {"stream_options": {"continuous_usage_stats": True, "include_usage": False}}
    assert ask_usage(kept)
    assert kept["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert not ask_usage({"stream_options": {"include_usage": True}})  # the client's own

    chunks = [{"choices": [{"delta": {"content": f"t{i}"}}]} for i in range(5)]
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5}}
    for separator in (b"\n\n", b"\r\n\r\n"):
        events = [b"data: " + json.dumps(e).encode() + separator for e in [*chunks, usage]]
        data = b"".join(events) + b"data: [DONE]" + separator
        wanted = b"".join(events[:-1]) + b"data: [DONE]" + separator
        for step in (1, 7, 37, len(data)):  # reads end anywhere
            strip = UsageStrip()
            got = b"".join(strip.feed(data[i : i + step]) for i in range(0, len(data), step))
            assert got + strip.close() == wanted, (separator, step)
    # a stream that is not SSE passes on whole once it ends (or past the bound, as it comes)
    strip = UsageStrip()
    assert strip.feed(b'{"usage": 1') == b"" and strip.close() == b'{"usage": 1'


def test_ledger_sends_what_changed_per_key_and_endpoint_until_it_is_stored() -> None:
    rows = {("gemma", "key_a", 200): [2, 4, 5], ("gemma", "key_a", 500): [1, 0, 0]}
    rows[("gemma", "key_b", 200)] = [1, 2, 2]
    ledger = Ledger()
    changed, totals = ledger.unsent(rows)  # [requests, prompt, completion, errors]
    assert changed == {("key_a", "gemma"): [3, 4, 5, 1], ("key_b", "gemma"): [1, 2, 2, 0]}
    rows[("gemma", "key_a", 200)] = [3, 5, 5]
    changed, _ = ledger.unsent(rows)  # the first was never stored: it all goes again
    assert changed[("key_a", "gemma")] == [4, 5, 5, 1]
    ledger.sent(totals)
    changed, totals = ledger.unsent(rows)
    assert changed == {("key_a", "gemma"): [1, 1, 0, 0]}
    ledger.sent(totals)
    assert ledger.unsent(rows)[0] == {}
    rows[("gemma", "key_b", 429)] = [2, 0, 0]  # refused requests are errors too
    assert ledger.unsent(rows)[0] == {("key_b", "gemma"): [2, 0, 0, 2]}


def test_a_request_its_client_left_counts_as_a_request_and_no_error() -> None:
    """A stream the client stopped (the playground's Stop, a closed SDK iterator) got no error
    reply: it is recorded as 499 in the metrics, and in usage as a request without an error."""
    rows = {("gemma", "key_a", 200): [1, 4, 5], ("gemma", "key_a", 499): [2, 0, 0]}
    changed, _ = Ledger().unsent(rows)
    assert changed == {("key_a", "gemma"): [3, 4, 5, 0]}
