"""Usage taken from reply bytes without changing them: JSON bodies, streams, the ledger."""

from __future__ import annotations

import json

from forwarder.usage import Ledger, StreamUsage, usage_from_json


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


def test_usage_from_the_last_chunks_of_a_stream() -> None:
    events = [{"choices": [{"delta": {"content": f"t{i}"}}], "usage": None} for i in range(20)]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 20}})
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    data += b"data: [DONE]\n\n"
    watch = StreamUsage()
    for i in range(0, len(data), 37):  # chunk boundaries fall anywhere
        watch.feed(data[i : i + 37])
    assert watch.result() == (5, 20)


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
