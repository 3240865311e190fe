"""Ships each running replica's output into a capped Redis stream, so the api can show and
follow logs without access to Docker. One thread per container, run by the builder's loop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis

from appliance import bus
from builder.runtime import ContainerRuntime

logger = logging.getLogger(__name__)


@dataclass
class LogShipper:
    docker: ContainerRuntime
    redis: redis.Redis
    _threads: dict[str, threading.Thread] = field(default_factory=dict)

    def sync(self, running: Mapping[str, str]) -> None:
        """Follow every running replica (replica id -> container id); forget removed ones."""
        for replica_id, container_id in running.items():
            thread = self._threads.get(replica_id)
            if thread is None or not thread.is_alive():
                self._threads[replica_id] = self._start(replica_id, container_id)
        for replica_id in [r for r in self._threads if r not in running]:
            if not self._threads[replica_id].is_alive():
                del self._threads[replica_id]

    def forget(self, replica_ids: list[str]) -> None:
        if replica_ids:
            self.redis.delete(*(bus.LOGS_KEY.format(replica=r) for r in replica_ids))

    def _start(self, replica_id: str, container_id: str) -> threading.Thread:
        thread = threading.Thread(
            target=self._ship,
            args=(replica_id, container_id),
            name=f"logs-{replica_id}",
            daemon=True,
        )
        thread.start()
        return thread

    def _ship(self, replica_id: str, container_id: str) -> None:
        key = bus.LOGS_KEY.format(replica=replica_id)
        try:
            self.redis.delete(key)  # re-attaching replays the tail; start the stream afresh
            for chunk in self.docker.follow_logs(container_id, tail=bus.LOGS_KEPT_LINES):
                self.redis.xadd(key, {"line": chunk}, maxlen=bus.LOGS_KEPT_LINES, approximate=True)
        except Exception as exc:  # the container went away, or Redis did: next tick retries
            logger.debug("log shipping for %s ended: %s", replica_id, exc)
