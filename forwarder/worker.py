"""Entry point of the worker role (`appliance worker`): RQ workers for async tasks."""

from __future__ import annotations

import logging
import threading

from rq import Worker

from appliance import bus
from appliance.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_QUEUE = "appliance:default"
HEARTBEAT_EVERY_S = 10.0


def main(settings: Settings) -> None:
    redis = bus.connect(str(settings.redis_url))
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.is_set():
            try:
                bus.beat(redis, "worker")
            except Exception:
                logger.warning("cannot reach Redis for the heartbeat")
            stop.wait(HEARTBEAT_EVERY_S)

    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    try:
        Worker([DEFAULT_QUEUE], connection=redis).work(with_scheduler=False)
    finally:
        stop.set()
