"""Usage taken from reply bytes without changing them: JSON bodies, streams, the ledger."""

from __future__ import annotations

import json

from forwarder.usage import Ledger, StreamUsage, usage_from_json


def test_usage_from_a_json_body() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    assert usage_from_json(body.encode()) == (7, 3)
    assert usage_from_json(b'{"choices": []}') is None
    assert usage_from_json(b'{"usage": null}') is None


def test_usage_from_the_last_chunks_of_a_stream() -> None:
    events = [{"choices": [{"delta": {"content": f"t{i}"}}], "usage": None} for i in range(20)]
    events.append({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 20}})
    data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    data += b"data: [DONE]\n\n"
    watch = StreamUsage()
    for i in range(0, len(data), 37):  # chunk boundaries fall anywhere
        watch.feed(data[i : i + 37])
    assert watch.result() == (5, 20)


def test_ledger_sums_per_key_and_endpoint_and_restores() -> None:
    ledger = Ledger()
    ledger.add("key_a", "gemma", 3, 4)
    ledger.add("key_a", "gemma", 1, 1)
    ledger.add("key_b", "gemma", 2, 2)
    taken = ledger.take()
    assert taken == {("key_a", "gemma"): [2, 4, 5], ("key_b", "gemma"): [1, 2, 2]}
    assert ledger.take() == {}
    ledger.add("key_a", "gemma", 1, 0)
    ledger.restore(taken)
    assert ledger.pending[("key_a", "gemma")] == [3, 5, 5]
