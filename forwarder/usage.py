"""Token usage taken from replies without touching the bytes the client gets, and the
per-key, per-endpoint ledger the live publisher flushes to Redis.

Bodies pass through untouched; only a copy of the part that holds `usage` is decoded: the end
of a JSON body, or the last few chunks of a stream (OpenAI's final usage chunk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

USAGE_MARK = b'"usage"'
USAGE_SPAN_BYTES = 4096  # how far past `"usage": {` its counts are looked for
_OPENING = re.compile(rb"\s*:\s*\{")
_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens)"\s*:\s*(\d+)')


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
    """The token counts of the `usage` object opening at `at` (right after its key)."""
    opening = _OPENING.match(body, at)
    if opening is None:  # `"usage": null`
        return None
    found: dict[bytes, int] = {}
    for count in _COUNT.finditer(body, opening.end(), opening.end() + USAGE_SPAN_BYTES):
        found.setdefault(count[1], int(count[2]))
        if len(found) == 2:
            return found[b"prompt_tokens"], found[b"completion_tokens"]
    return None


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
