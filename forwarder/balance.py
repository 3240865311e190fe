"""The replica choice that every forwarded request passes through twice: least outstanding
requests among an endpoint's ready replicas, under their cap, when it is sent (`take`,
`try_acquire`), and its count given back when it ends (`release`, `done`).

Compiled with the fast lane (`setup.py`), so the lane calls no interpreted code per request
for it. `Forwarder` (`forwarder/proxy.py`) makes one and shares its counters, failure counts
and ejected set with it; the waiting, the ejecting and the health probes stay there.
"""

from __future__ import annotations

from collections.abc import Sequence
from time import time as wall_time
from typing import TYPE_CHECKING

from forwarder.shared import SharedCounts
from forwarder.table import Target, TargetReplica

if TYPE_CHECKING:
    from forwarder.proxy import Forwarder


class Balancer:
    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        # the forwarder's own containers, shared: each is changed in place, never replaced
        self.inflight: dict[str, int] = forwarder.inflight  # replica id -> this process's
        self.shared: SharedCounts | None = forwarder.shared
        self.endpoint_of: dict[str, str] = forwarder.endpoint_of
        self.failures: dict[str, int] = forwarder.failures
        self.ejected: set[str] = forwarder.ejected
        self.last_request: dict[str, float] = forwarder.last_request
        self.slot_waiters = 0  # requests waiting for a replica under its cap

    def load(self, replica_id: str) -> int:
        """Requests in flight to the replica from every api worker."""
        if self.shared is not None:
            return self.shared.total(replica_id)
        return self.inflight.get(replica_id, 0)

    def take(
        self, target: Target, candidates: Sequence[TargetReplica]
    ) -> tuple[TargetReplica | None, int]:
        """The least loaded candidate, counted in flight if it is under the cap; and the cap."""
        best = candidates[0]
        least = self.load(best.id)
        for i in range(1, len(candidates)):
            load = self.load(candidates[i].id)
            if load < least:
                best, least = candidates[i], load
        cap = target.max_concurrency or self.forwarder.limits.replica_max_concurrency
        if least >= cap:
            return None, cap
        self.inflight[best.id] = self.inflight.get(best.id, 0) + 1
        if self.shared is not None:
            self.shared.add(best.id, 1)
        self.endpoint_of[best.id] = target.name
        return best, cap

    def try_acquire(self, target: Target, avoid: set[str] | None) -> TargetReplica | None:
        """A ready replica under its cap (one not in `avoid`, when given), counted in flight,
        or None when the request would have to wait (no ready replica, every one at its cap):
        `Forwarder.acquire` without the waiting. The caller reports the outcome with `done`."""
        live = target.replicas if not self.ejected else self.forwarder.live_replicas(target)
        if avoid:
            live = tuple(r for r in live if r.id not in avoid)
        if not live:
            return None
        self.last_request[target.endpoint_id] = wall_time()
        return self.take(target, live)[0]

    def release(self, replica_id: str) -> None:
        """A request counted by `take` ended."""
        if self.shared is not None and replica_id in self.inflight:
            self.shared.add(replica_id, -1)
        left = self.inflight.get(replica_id, 1) - 1
        if left > 0:
            self.inflight[replica_id] = left
        else:
            self.inflight.pop(replica_id, None)
        if self.slot_waiters:
            self.forwarder.slot_freed()

    def done(self, target: Target, replica_id: str, ok: bool) -> None:
        """A request counted by `try_acquire` ended; `ok` False counts towards ejection."""
        self.release(replica_id)
        if ok:
            if self.failures:
                self.failures.pop(replica_id, None)
        else:
            self.forwarder.failed(target, replica_id)
