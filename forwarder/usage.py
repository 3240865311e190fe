"""Token usage taken from replies without touching the bytes the client gets, and the
per-key, per-endpoint ledger the live publisher flushes to Redis (`forwarder/rollup.py` says
how, and how it then reaches the usage table).

Bodies pass through untouched; only a copy of the part that holds `usage` is decoded: the end
of a JSON body, or the last few chunks of a stream (OpenAI's final usage chunk, or the
Responses API's `response.completed` event, whose response ends with its usage). A stream cut
short before that (its client left, its replica failed or went silent) is counted by what its
client was sent (`StreamUsage.counted`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from forwarder.scan import digits, space_end, starts

if TYPE_CHECKING:  # only annotations name it (strings at run time); compiled, a native int
    from mypy_extensions import i64

USAGE_MARK = b'"usage"'
OPEN: Final = 123  # {
CLOSE: Final = 125  # }
QUOTE: Final = 34  # "
USAGE_SPAN_BYTES = 4096  # how far past `"usage": {` its counts are looked for
_OPENING = re.compile(rb"\s*:\s*\{")
_PAIR = re.compile(
    rb'\s*:\s*\{[^{}]*?"(prompt|completion)_tokens"\s*:\s*(\d+)'
    rb'[^{}]*?"(prompt|completion)_tokens"\s*:\s*(\d+)'
)
_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)')
# The Responses API's names of the two counts (`input_tokens`, `output_tokens`)
_SAME: Final = {b"input_tokens": b"prompt_tokens", b"output_tokens": b"completion_tokens"}


def usage_from_json(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last non-null `usage` object in `body`, if any."""
    end = len(body)
    while True:
        at = body.rfind(USAGE_MARK, 0, end)
        if at < 0:
            return None
        prompt, completion = _usual_counts(body, at + len(USAGE_MARK))
        if prompt >= 0:
            return prompt, completion
        found = _decode_usage(body, at + len(USAGE_MARK))
        if found is not None:
            return found
        end = at


def _usual_counts(body: bytes, at: i64) -> tuple[i64, i64]:
    """The token counts of the `usage` object opening at `at` (right after its key) in the
    usual shape, both counts before any nested object, read byte by byte (`forwarder/scan.py`);
    (-1, -1) for any other shape, which `_decode_usage` then reads. It finds what `_PAIR` and
    `_COUNT` would: the first valid count of each name."""
    at = space_end(body, at)
    if not starts(body, at, b":"):
        return -1, -1
    at = space_end(body, at + 1)
    if not starts(body, at, b"{"):
        return -1, -1
    prompt: i64 = -1
    completion: i64 = -1
    size: i64 = len(body)
    at += 1
    while at < size:
        c: i64 = body[at]
        if c in (OPEN, CLOSE):
            return -1, -1
        if c == QUOTE:
            if prompt < 0 and starts(body, at, b'"prompt_tokens"'):
                at, prompt = _count(body, at + 15)
            elif completion < 0 and starts(body, at, b'"completion_tokens"'):
                at, completion = _count(body, at + 19)
            else:
                at += 1
            if prompt >= 0 and completion >= 0:
                return prompt, completion
        else:
            at += 1
    return -1, -1


def _count(body: bytes, at: i64) -> tuple[i64, i64]:
    """After a count's key at `at`: where to read on, and the count (`\\s*:\\s*\\d+`), or -1
    when the key is followed by something else."""
    at = space_end(body, at)
    if not starts(body, at, b":"):
        return at, -1
    at = space_end(body, at + 1)
    stop: i64 = at
    while stop < len(body) and 48 <= body[stop] <= 57:
        stop += 1
    number = digits(body, at, stop)
    return (stop, number) if number >= 0 else (at, -1)


def _decode_usage(body: bytes, at: int) -> tuple[int, int] | None:
    """The token counts of the `usage` object opening at `at` (right after its key), by
    OpenAI's usual names or the Responses API's; an embeddings reply's usage has no
    `completion_tokens`, counted as none."""
    pair = _PAIR.match(body, at)  # the usual shape: both counts before any nested object
    if pair is not None and pair[1] != pair[3]:
        first, second = int(pair[2]), int(pair[4])
        return (first, second) if pair[1] == b"prompt" else (second, first)
    opening = _OPENING.match(body, at)
    if opening is None:  # `"usage": null`
        return None
    found: dict[bytes, int] = {}
    end = _object_end(body, opening.end(), opening.end() + USAGE_SPAN_BYTES)
    for count in _COUNT.finditer(body, opening.end(), end):
        found.setdefault(_SAME.get(count[1], count[1]), int(count[2]))
        if len(found) == 2:
            return found[b"prompt_tokens"], found[b"completion_tokens"]
    if b"prompt_tokens" in found:  # an embeddings reply's: no completion
        return found[b"prompt_tokens"], 0
    return None


def _object_end(body: bytes, start: int, limit: int) -> int:
    """Where the object whose `{` ends just before `start` closes (at most `limit`), so a
    count past it, in another object, is not taken for its own."""
    depth = 0
    for at in range(start, min(limit, len(body))):
        c = body[at]
        if c == OPEN:
            depth += 1
        elif c == CLOSE:
            if depth == 0:
                return at
            depth -= 1
    return limit


# A stream's own usage comes at its end. One cut short (its client left, its replica failed or
# went silent) is counted by what its client was sent: each event of an OpenAI chat or
# completions stream from vLLM or llama.cpp carries about one token, as does each delta event
# of a Responses API stream (`response.output_text.delta`, and the reasoning, refusal and
# function call arguments ones). Events are counted by a mark in the bytes, not parsed: the
# blank line that ends an SSE event (JSON inside an event holds no raw line break), or the end
# of a delta event's type (`.delta"`; the quote in a text is escaped). The prompt is estimated
# from the request's size. A custom image's stream is no token stream: it counts none.
EVENT_END: Final = b"\n\n"
DELTA_TYPE_END: Final = b'.delta"'
RESPONSES_PATH: Final = b"/v1/responses"
TOKEN_EVENT_FRAMEWORKS: Final = ("vllm", "llamacpp")
PROMPT_BYTES_PER_TOKEN: Final = 4  # about, for English text and the JSON around it


def token_mark(framework: str, path: bytes) -> bytes:
    """What marks one token's event in a stream from `framework`'s replica `path` (b"": its
    events are not tokens)."""
    if framework not in TOKEN_EVENT_FRAMEWORKS:
        return b""
    return DELTA_TYPE_END if path == RESPONSES_PATH else EVENT_END


@dataclass
class StreamUsage:
    """Watches a stream's chunks (keeping references to the last few, no copies) for usage,
    and counts its token events (`mark`, from `token_mark`; b"": none)."""

    keep: int = 3
    mark: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    events: int = 0

    def feed(self, chunk: bytes) -> None:
        if self.mark:
            self.events += chunk.count(self.mark)
        chunks = self.chunks
        chunks.append(chunk)
        if len(chunks) > self.keep:
            del chunks[0]

    def result(self) -> tuple[int, int] | None:
        return usage_from_json(b"".join(self.chunks))

    def counted(self, request_bytes: int) -> tuple[int, int] | None:
        """The stream's usage: its own, else (cut short) its token events sent so far as
        completion tokens and the request's size (`request_bytes`) over PROMPT_BYTES_PER_TOKEN
        as prompt tokens; None when it has neither (no token event was sent)."""
        found = self.result()
        if found is not None or self.events <= 0:
            return found
        return request_bytes // PROMPT_BYTES_PER_TOKEN, self.events


# A stream's usage is counted from the usage-only chunk OpenAI's servers send last when the
# request asks for it (`stream_options.include_usage`). A stream that does not ask for it would
# count no tokens, so the appliance asks on its behalf (`ask_usage`) and takes that chunk out
# of what the client gets (`UsageStrip`): the client sees the stream it asked for, and its
# tokens are counted as any other request's.
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_EVENT = re.compile(rb".*?(?:\r?\n){2}", re.S)
EVENT_HELD_MAX_BYTES: Final = 1024 * 1024  # past this, an event without its end passes on


def ask_usage(payload: dict[str, object]) -> bool:
    """Make a stream's request ask for its usage; True when it did not (it was changed)."""
    options = payload.get("stream_options")
    if options is None:
        payload["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and not options.get("include_usage"):
        payload["stream_options"] = {**options, "include_usage": True}
        return True
    return False  # asked for already, or not an object: the replica answers that itself


class UsageStrip:
    """A stream's events less the usage-only one the appliance asked for (`ask_usage`). Whole
    events pass on as they came; an event cut across reads waits for its end."""

    def __init__(self) -> None:
        self.tail = b""

    def feed(self, data: bytes) -> bytes:
        if not self.tail and data.endswith(b"\n\n") and USAGE_MARK not in data:
            return data  # the usual read: whole events, none of them the usage chunk
        held = self.tail + data
        whole: list[bytes] = _EVENT.findall(held)
        end = sum(len(event) for event in whole)
        self.tail = held[end:]
        if len(self.tail) > EVENT_HELD_MAX_BYTES:  # not SSE as the replica should send it
            whole.append(self.tail)
            self.tail = b""
        return b"".join(event for event in whole if not _usage_only(event))

    def close(self) -> bytes:
        """What is left at the stream's end (an event without its end)."""
        tail, self.tail = self.tail, b""
        return tail


def _usage_only(event: bytes) -> bool:
    return USAGE_MARK in event and _EMPTY_CHOICES.search(event) is not None


Totals = dict[tuple[str, str], list[int]]  # (key id, endpoint) -> USAGE_COUNTS
USAGE_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "errors")
FIRST_ERROR_STATUS: Final = 400
CLIENT_CLOSED: Final = 499  # nginx's code for a client that went away: no reply, so no error


@dataclass
class Ledger:
    """Usage per (key id, endpoint name) not yet stored in Redis, worked out once a second from
    the running totals the request stats keep anyway, so a request adds nothing here."""

    stored: Totals = field(default_factory=dict)

    def unsent(self, rows: Mapping[tuple[str, str, int], list[int]]) -> tuple[Totals, Totals]:
        """What changed since the last `sent`, and the totals to pass to `sent` once stored.
        `rows`: (endpoint, key id, status) -> [requests, prompt, completion], running totals;
        a status of 400 or more counts its requests as errors too, but for CLIENT_CLOSED."""
        totals: Totals = {}
        for (endpoint, key_id, status), row in list(rows.items()):
            errors = row[0] if FIRST_ERROR_STATUS <= status != CLIENT_CLOSED else 0
            mine = totals.get((key_id, endpoint))
            if mine is None:
                totals[(key_id, endpoint)] = [row[0], row[1], row[2], errors]
            else:
                mine[0] += row[0]
                mine[1] += row[1]
                mine[2] += row[2]
                mine[3] += errors
        changed = {}
        for label, row in totals.items():
            before = self.stored.get(label, [0, 0, 0, 0])
            if row != before:
                changed[label] = [now - then for now, then in zip(row, before, strict=True)]
        return changed, totals

    def sent(self, totals: Totals) -> None:
        """What `unsent` returned is in Redis now."""
        self.stored = totals
