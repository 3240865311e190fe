"""The replica choice that every forwarded request passes through twice: least outstanding
requests among a route's ready replicas, under their cap, when it is sent (`take`,
`try_acquire`), and its count given back when it ends (`release`, `done`).

Compiled with the fast lane (`setup.py`), so the lane calls no interpreted code per request
for it. `Forwarder` (`forwarder/proxy.py`) makes one and shares its counters, failure counts
and ejected set with it; the waiting, the ejecting and the health probes stay there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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
        self, route: Target, candidates: Sequence[TargetReplica]
    ) -> tuple[TargetReplica | None, int]:
        """The least loaded candidate, counted in flight if it is under the cap; and the cap."""
        best = candidates[0]
        least = self.load(best.id)
        for i in range(1, len(candidates)):
            load = self.load(candidates[i].id)
            if load < least:
                best, least = candidates[i], load
        cap = route.max_concurrency or self.forwarder.limits.replica_max_concurrency
        if least >= cap:
            return None, cap
        self.inflight[best.id] = self.inflight.get(best.id, 0) + 1
        if self.shared is not None:
            self.shared.add(best.id, 1)
        self.endpoint_of[best.id] = route.name
        return best, cap

    def try_acquire(self, route: Target) -> TargetReplica | None:
        """A ready replica under its cap, counted in flight, or None when the request would
        have to wait (no ready replica, every one at its cap): `Forwarder._acquire` without
        the waiting. The caller reports the outcome with `done`."""
        live = route.replicas if not self.ejected else self.forwarder.live_replicas(route)
        if not live:
            return None
        self.last_request[route.endpoint_id] = time.time()
        return self.take(route, live)[0]

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

    def done(self, route: Target, replica_id: str, ok: bool) -> None:
        """A request counted by `try_acquire` ended; `ok` False counts towards ejection."""
        self.release(replica_id)
        if ok:
            if self.failures:
                self.failures.pop(replica_id, None)
        else:
            self.forwarder.failed(route, replica_id)
