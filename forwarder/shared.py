"""Requests in flight per replica, shared by the api's worker processes (`api_workers` > 1).

`api/serve.py` makes one `SharedCounts` before it forks the workers: an anonymous shared
memory mapping with one row of counters per worker. Each worker adds to its own row only (no
locks: one writer per row), and reads a replica's load as the sum of the rows, so least-
outstanding choice, per-replica caps and the builder's drain and scale signals see every
worker's requests, not just the caller's.

A replica id maps to a slot by CRC-32; two replicas that share a slot (about 1 in 3,000 for
ten replicas) are counted together, which can only make the choice between them less even.
"""

from __future__ import annotations

import mmap
import zlib

SLOTS = 1 << 15
COUNTER_BYTES = 8


class SharedCounts:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._mem = mmap.mmap(-1, workers * SLOTS * COUNTER_BYTES)  # MAP_SHARED: kept on fork
        view = memoryview(self._mem).cast("q")
        self.rows = [view[i * SLOTS : (i + 1) * SLOTS] for i in range(workers)]
        self.own = self.rows[0]
        self._slots: dict[str, int] = {}

    def bind(self, worker: int) -> None:
        """This process is worker `worker`: its row starts from zero."""
        self.own = self.rows[worker]
        for i in range(SLOTS):
            self.own[i] = 0

    def slot(self, replica_id: str) -> int:
        found = self._slots.get(replica_id)
        if found is None:
            found = self._slots[replica_id] = zlib.crc32(replica_id.encode()) % SLOTS
        return found

    def add(self, replica_id: str, delta: int) -> None:
        self.own[self.slot(replica_id)] += delta

    def total(self, replica_id: str) -> int:
        slot = self.slot(replica_id)
        total = 0
        for row in self.rows:
            total += row[slot]
        return total
