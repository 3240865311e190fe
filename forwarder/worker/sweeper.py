"""The worker's sweeper: SQLite is the truth about tasks, Redis only carries them.

Every `sweep_interval_s` one sweeper (a Redis lock keeps it to one per install):
- re-enqueues each unfinished task that is neither on its queue nor leased by a live worker
  (Redis lost the job, was wiped, or the worker died), after a grace period;
- fails tasks that used up their attempts;
- finishes batches whose requests all ended (output and error files);
- publishes every endpoint's backlog (queued + running) for the scaler;
- deletes finished tasks whose keep time passed;
- rolls the usage the api counted into the usage table (`forwarder/rollup.py`);
- once an hour, deletes audit entries older than their retention.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from appliance import audit, bus
from appliance.db import session_scope
from forwarder import rollup
from forwarder.worker import batches, jobs
from forwarder.worker.runner import LEASE_PREFIX

logger = logging.getLogger(__name__)

LOCK_KEY = "appliance:sweeper:lock"
CANDIDATES_PER_SWEEP = 20_000
AUDIT_PRUNE_EVERY_S = 3600.0


class Sweeper:
    def __init__(
        self,
        engine: Engine,
        client: redis.Redis,
        *,
        files_dir: Path,
        grace_s: float,
        interval_s: float,
        audit_retention_days: int = 365,
        audit_max_entries_per_team: int = 0,
    ) -> None:
        self.audit_retention_days = audit_retention_days
        self.audit_max_entries_per_team = audit_max_entries_per_team
        self._audit_pruned_at = 0.0
        self.engine = engine
        self.redis = client
        self.files_dir = files_dir
        self.grace_s = grace_s
        self.interval_s = interval_s

    def loop(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            try:
                self.sweep()
            except redis.RedisError as exc:  # a line a sweep while Redis is down
                logger.warning(
                    "Redis unavailable: %s; sweeping again in %.1f s", exc, self.interval_s
                )
            except OperationalError as exc:  # a full disk, a locked database
                logger.warning(
                    "the database refused the sweep: %s; sweeping again in %.1f s",
                    exc.orig or exc,
                    self.interval_s,
                )
            except Exception:
                logger.exception("sweep failed; trying again in %.1f s", self.interval_s)

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not self.redis.set(LOCK_KEY, "1", nx=True, px=int(self.interval_s * 2000)):
            return
        try:
            requeued = self.requeue_lost(now)
            if requeued:
                logger.info("re-enqueued %d tasks that Redis or a worker lost", requeued)
            batches.finish_batches(self.engine, self.files_dir, now)
            self.publish_backlog()
            self.drop_expired(now)
            rollup.roll_up(self.redis, self.engine, now)
            if now - self._audit_pruned_at >= AUDIT_PRUNE_EVERY_S:
                with session_scope(self.engine) as session:
                    audit.prune(
                        session, now, self.audit_retention_days, self.audit_max_entries_per_team
                    )
                self._audit_pruned_at = now
        finally:
            self.redis.delete(LOCK_KEY)

    def requeue_lost(self, now: float) -> int:
        with self.engine.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, endpoint_id, batch_id IS NOT NULL, owner FROM task "
                    "WHERE status IN ('PENDING', 'STARTED') "
                    "AND COALESCE(enqueued_at, created_at) < :cutoff LIMIT :n"
                ),
                {"cutoff": now - self.grace_s, "n": CANDIDATES_PER_SWEEP},
            ).all()
        if not rows:
            return 0
        queued = self._queued_ids({r[1] for r in rows})
        with self.redis.pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.exists(LEASE_PREFIX + row[0])
            leased = pipe.execute()
        lost = [r for r, held in zip(rows, leased, strict=True) if not held and r[0] not in queued]
        # a task whose attempts are spent is enqueued too: the worker that claims it ends it
        # FAILURE without running it, and calls back (`jobs.run_task`), as for any other end
        with self.engine.begin() as conn:
            for row in lost:  # mark first: a crash between the two only delays the task
                conn.execute(
                    text("UPDATE task SET enqueued_at = :now WHERE id = :id"),
                    {"id": row[0], "now": now},
                )
        by_priority: dict[bool, list[tuple[str, str, str]]] = defaultdict(list)
        for row in lost:
            by_priority[bool(row[2])].append((row[0], row[1], row[3]))
        for low, items in by_priority.items():
            jobs.enqueue(self.redis, items, low=low)
        return len(lost)

    def _queued_ids(self, endpoint_ids: set[str]) -> set[str]:
        """The ids waiting in any queue of the endpoints (each team's, and the endpoint's own)."""
        keys = jobs.team_queue_keys(self.redis, sorted(endpoint_ids))
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.lrange(key, 0, -1)
            lists = pipe.execute()
        return {i.decode() for ids in lists for i in ids}

    def publish_backlog(self) -> None:
        """appliance:backlog: endpoint id -> unfinished tasks (queued + running), from SQLite."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                text(
                    "SELECT endpoint_id, COUNT(*) FROM task "
                    "WHERE status IN ('PENDING', 'STARTED') GROUP BY endpoint_id"
                )
            ).all()
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(bus.BACKLOG_KEY)
            if rows:
                pipe.hset(bus.BACKLOG_KEY, mapping={r[0]: int(r[1]) for r in rows})
            pipe.execute()

    def drop_expired(self, now: float) -> None:
        """Finished tasks past their TTL, but never the answers of a batch still running: its
        output and error files are written from them once its last request ends."""
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "DELETE FROM task WHERE status IN ('SUCCESS', 'FAILURE') "
                    "AND expires_at IS NOT NULL AND expires_at < :now "
                    "AND (batch_id IS NULL OR batch_id NOT IN "
                    "(SELECT id FROM batch WHERE status IN ('in_progress', 'cancelling')))"
                ),
                {"now": now},
            )
