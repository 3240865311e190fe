"""Token usage taken from replies without touching the bytes the client gets, and the
per-key, per-endpoint ledger the live publisher flushes to Redis.

Bodies pass through untouched; only a copy of the part that holds `usage` is decoded: the end
of a JSON body, or the last few chunks of a stream (OpenAI's final usage chunk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

USAGE_MARK = b'"usage"'
_decoder = json.JSONDecoder()


def usage_from_json(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last non-null `usage` object in `body`, if any."""
    end = len(body)
    while True:
        at = body.rfind(USAGE_MARK, 0, end)
        if at < 0:
            return None
        found = _decode_usage(body, at + len(USAGE_MARK))
        if found is not None:
            return found
        end = at


def _decode_usage(body: bytes, at: int) -> tuple[int, int] | None:
    colon = body.find(b":", at, at + 16)
    if colon < 0:
        return None
    brace = body.find(b"{", colon, colon + 16)
    if brace < 0:  # `"usage": null`
        return None
    try:
        value, _ = _decoder.raw_decode(body[brace : brace + 4096].decode("utf-8", "replace"))
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens")
    completion = value.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


@dataclass
class StreamUsage:
    """Watches a stream's chunks (keeping references to the last few, no copies) for usage."""

    keep: int = 3
    chunks: list[bytes] = field(default_factory=list)

    def feed(self, chunk: bytes) -> None:
        chunks = self.chunks
        chunks.append(chunk)
        if len(chunks) > self.keep:
            del chunks[0]

    def result(self) -> tuple[int, int] | None:
        return usage_from_json(b"".join(self.chunks))


@dataclass
class Ledger:
    """Requests and tokens per (key id, endpoint name) since the last `take`."""

    pending: dict[tuple[str, str], list[int]] = field(default_factory=dict)

    def add(self, key_id: str, endpoint: str, prompt: int, completion: int) -> None:
        row = self.pending.get((key_id, endpoint))
        if row is None:
            self.pending[(key_id, endpoint)] = [1, prompt, completion]
        else:
            row[0] += 1
            row[1] += prompt
            row[2] += completion

    def take(self) -> dict[tuple[str, str], list[int]]:
        taken, self.pending = self.pending, {}
        return taken

    def restore(self, taken: dict[tuple[str, str], list[int]]) -> None:
        """Put back what `take` returned when it could not be stored."""
        for key, row in taken.items():
            mine = self.pending.setdefault(key, [0, 0, 0])
            for i, value in enumerate(row):
                mine[i] += value
