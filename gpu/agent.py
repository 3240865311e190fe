"""The GPU agent (`appliance gpu-agent`): reads NVML and publishes the inventory to Redis, in a
container the builder starts with every GPU of the box (`builder/gpu_agent.py` reads it).

It exists so that the builder's own container needs no GPU reservation: compose's one file then
comes up on any box. Where NVIDIA's container runtime is missing, the agent's container cannot
start and the appliance runs CPU replicas only.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from types import FrameType

import redis

from appliance import bus
from appliance.settings import Settings
from gpu.inventory import GpuSource

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 5.0


def publish(client: redis.Redis, source: GpuSource) -> None:
    """One look at the GPUs, stored for the builder with when it was taken."""
    inventory = source.read()
    record = {"at": time.time(), "inventory": inventory.to_json()}
    client.set(bus.GPU_AGENT_KEY, json.dumps(record), ex=bus.GPU_AGENT_TTL_S)


def run(client: redis.Redis, source: GpuSource, stop: threading.Event, every_s: float) -> None:
    while not stop.is_set():
        try:
            publish(client, source)
        except redis.RedisError as exc:
            logger.warning("cannot publish the GPU inventory: %s", exc)
        stop.wait(every_s)


def main(settings: Settings) -> None:
    from gpu.nvml import NvmlGpuSource  # the agent's container is where NVML is

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("GPU agent publishing every %.0f s", PUBLISH_EVERY_S)
    run(bus.connect(str(settings.redis_url)), NvmlGpuSource(), stop, PUBLISH_EVERY_S)
