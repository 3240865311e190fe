"""The GPU inventory as the GPU agent sees it: the builder's `GpuSource` when it runs in a
container (compose), where NVML is out of its reach.

The agent (`gpu/agent.py`) runs in a container of the appliance's own image that the builder
starts with every GPU of the box; it publishes what NVML sees to Redis, and `read` returns the
last look. Where the Docker Engine has no NVIDIA runtime the agent cannot start: the inventory
is empty, its message says why, and the appliance serves CPU replicas only.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import redis

from appliance import bus
from builder.docker_engine import UNANSWERED, DockerEngine, DockerUnavailableError, GpuAgentError
from gpu.inventory import Inventory

logger = logging.getLogger(__name__)

RETRY_S = 60.0  # how often a missing agent is started again
_NO_GPUS = "endpoints must use gpus=0"


@dataclass
class AgentGpuSource:
    """Starts the agent when its last look is missing or stale, and reads that look."""

    docker: DockerEngine
    redis: redis.Redis
    image: str
    env: dict[str, str]
    network: str | None
    _problem: str | None = None
    _started_at: float = float("-inf")

    def read(self) -> Inventory:
        try:
            raw = self.redis.get(bus.GPU_AGENT_KEY)
        except redis.RedisError as exc:
            return Inventory(gpus=(), message=f"cannot read the GPU agent's inventory: {exc}")
        first = self._started_at == float("-inf")  # a new builder: is the agent there?
        if first or (raw is None and time.monotonic() - self._started_at >= RETRY_S):
            self._started_at = time.monotonic()
            self._start()
        if raw is not None:
            return Inventory.from_json(json.loads(raw)["inventory"])
        if self._problem is not None:
            return Inventory(
                gpus=(),
                message="no GPUs: the Docker Engine cannot give the GPU agent GPUs (no NVIDIA "
                f"container runtime?): {self._problem}; {_NO_GPUS}",
            )
        return Inventory(gpus=(), message=f"waiting for the GPU agent's first look; {_NO_GPUS}")

    def _start(self) -> None:
        try:
            self.docker.ensure_gpu_agent(self.image, self.env, self.network)
        except GpuAgentError as exc:
            if self._problem is None:
                logger.info("no GPU agent, CPU replicas only: %s", exc)
            self._problem = str(exc)
            return
        except DockerUnavailableError:  # the loop says so each tick; the next read tries again
            self._started_at = float("-inf")
            return
        self._problem = None

    def close(self) -> None:
        """Stop the agent with the builder; the next builder starts it again."""
        try:
            self.docker.remove_gpu_agent()
        except (DockerUnavailableError, *UNANSWERED) as exc:
            logger.warning("cannot stop the GPU agent, the Docker Engine is unavailable: %s", exc)
