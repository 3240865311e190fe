"""Short, sortable, prefixed ids for endpoints, replicas, tasks and keys."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuv"


def new_id(prefix: str) -> str:
    """`end_`, `rep_`, `tsk_`... followed by a time-ordered base-32 string."""
    stamp = int(time.time() * 1000)
    chars = []
    for _ in range(9):
        chars.append(_ALPHABET[stamp & 31])
        stamp >>= 5
    return f"{prefix}_{''.join(reversed(chars))}{secrets.token_hex(5)}"
