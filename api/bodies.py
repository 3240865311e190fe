"""The bytes of request bodies that one api process holds, bounded: both transports take a
body's bytes from this budget before they read them, and an inference body keeps them until
its call ends (`api/inference/call.Call._settle`: answered, refused, failed, its client gone,
the api stopping): a body read whole stays in memory while its call waits (for its key's check,
a concurrency slot, a cold start of up to APPLIANCE_ACTIVATION_TIMEOUT_S, a replica under its
cap) and while it is relayed (the relay keeps it for retries). The fast lane
(`api/lane/front.py`) takes a body's declared length when its head came, whether the body came
with it or not; ASGI (`api/inference/asgi.read_body`) takes the declared length at once, a
chunked body's bytes as they come; each hands its `Reading` to the call. The bodies other
routes read whole into memory (management routes, the UI's forms) take theirs as the route
reads them and give them back once read (`api/shield.py`: the route answers at once), by key,
or by client address (`address <ip>`) where no key is asked. Async tasks and batch lines are
not held: they are stored (Redis, SQLite) and the api lets go of them once queued.

Counted by key, not by client address: both transports know the key valid before they read a byte
of a body (the lane's key cache, the ASGI key gate), a key is what the appliance limits everywhere
else and what a team has a bounded number of, and one address is often many clients (a company's
proxy), one client many addresses. The keys a key made count in its share, as in its other counts:
else an ordinary key made four keys and held the whole budget. Before, each body could hold
APPLIANCE_MAX_BODY_BYTES while it arrived: 30 slow bodies on one ordinary key held 475 MB; and once
read, while its call waited: 20 bodies of 16 MiB for an endpoint scaled to zero held 950 MB of the
api's memory (a body, its parsed form and the lane's read buffer) until their hold ended, bounded
only by the key's concurrency limit (none by default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from appliance.errors import ApplianceError, CapacityError, RateLimitedError
from appliance.settings import BODY_SHARES

# A body this small is never counted: more than a usual chat request, and whole in one read.
SMALL_BODY_BYTES: Final = 64 * 1024


class BodyBudget:
    """One api process's bytes of bodies in flight: `most` in all, `share` for each key, the
    keys a key made counting in its share (`counted_as`: a key's text to whose counts it is in,
    `api.callers.Keys.counted_as`), as they share its other limits and counts."""

    def __init__(self, most: int, counted_as: Callable[[str], str] | None = None) -> None:
        self.most = most
        self.counted_as = counted_as
        self.share = most // BODY_SHARES
        self.held = 0
        self.by_key: dict[str, int] = {}

    def take(self, key: str, size: int) -> ApplianceError | None:
        """Count `size` more bytes for `key`, or the refusal (then nothing is counted): 429 past
        the key's share, 503 past the whole budget."""
        mine = self.by_key.get(key, 0) + size
        if mine > self.share:
            whose = "this address's" if key.startswith("address") else "this key's"
            return RateLimitedError(
                f"{whose} request bodies still arriving are over its share of the api's "
                f"memory for them, {self.share} bytes (a quarter of "
                f"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT); send fewer large bodies at once, or "
                f"send them faster"
            )
        if self.held + size > self.most:
            return CapacityError(
                f"the api holds as many bytes of request bodies still arriving as it may "
                f"({self.most}, APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT); retry after Retry-After",
                retry_after_s=1,
            )
        self.by_key[key] = mine
        self.held += size
        return None

    def give(self, key: str, size: int) -> None:
        """Give back `size` bytes `key` took."""
        left = self.by_key.get(key, 0) - size
        if left > 0:
            self.by_key[key] = left
        else:
            self.by_key.pop(key, None)
        self.held -= size


class Reading:
    """What one body holds of a budget: its declared length from before its first byte, or,
    with none declared (chunked), its bytes so far as they come; given back once, when its
    reading ends (a management body) or its call does (an inference body). Bodies of
    SMALL_BODY_BYTES or less hold nothing."""

    __slots__ = ("budget", "key", "taken")

    def __init__(self, budget: BodyBudget, key: str) -> None:
        self.budget = budget
        # whose share: read once, so the bytes go back where they were taken
        counted_as = budget.counted_as
        self.key = counted_as(key) if counted_as is not None else key
        self.taken = 0  # -1 once given back: nothing more is taken

    def upto(self, size: int) -> ApplianceError | None:
        """Hold `size` bytes in all, or the refusal (then nothing more is held)."""
        if size <= self.taken or size <= SMALL_BODY_BYTES or self.taken < 0:
            return None
        refused = self.budget.take(self.key, size - self.taken)
        if refused is None:
            self.taken = size
        return refused

    def done(self) -> None:
        """The body is done with (its call over, or, outside inference, read whole), refused,
        or its client gone: give back what it held."""
        if self.taken > 0:
            self.budget.give(self.key, self.taken)
        self.taken = -1
