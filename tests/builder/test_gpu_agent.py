"""The GPU agent's round trip: what it publishes is what the builder reads; where its container
cannot start (no NVIDIA runtime), the builder sees no GPUs and a message that says why."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from builder.docker_engine import DockerEngine, GpuAgentError
from builder.gpu_agent import AgentGpuSource
from gpu import agent
from gpu.inventory import StaticGpuSource
from tests.harness import RedisServer

EIGHT_GPUS = "tests/gpu/eight_h100.json"


@dataclass
class Engine:
    """The two calls the source makes of the Docker adapter, as a box would answer them."""

    refuse: str | None = None
    started: list[str] = field(default_factory=list)

    def ensure_gpu_agent(self, image: str, env: dict[str, str], network: str | None) -> None:
        self.started.append(image)
        if self.refuse:
            raise GpuAgentError(self.refuse)

    def remove_gpu_agent(self, *, only_stopped: bool = False) -> None:
        self.started.clear()


def source(engine: Engine, client: redis.Redis) -> AgentGpuSource:
    docker: DockerEngine = engine  # type: ignore[assignment]
    return AgentGpuSource(docker, client, "appliance:test", {}, None)


def test_what_the_agent_publishes_is_what_the_builder_reads(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    engine = Engine()
    gpus = source(engine, client)
    assert gpus.read().gpus == () and "waiting for the GPU agent" in gpus.read().message
    assert engine.started == ["appliance:test"]  # started once, not on every read
    agent.publish(client, StaticGpuSource(EIGHT_GPUS))
    seen = gpus.read()
    assert (
        len(seen.gpus) == 8 and seen.gpus[0].name == StaticGpuSource(EIGHT_GPUS).read().gpus[0].name
    )
    gpus.close()
    assert engine.started == []


def test_without_the_nvidia_runtime_the_builder_sees_no_gpus_and_why(
    redis_server: RedisServer,
) -> None:
    refusal = 'could not select device driver "" with capabilities: [[gpu]]'
    gpus = source(Engine(refuse=refusal), redis.Redis.from_url(redis_server.url))
    seen = gpus.read()
    assert seen.gpus == ()
    assert refusal in seen.message and "gpus=0" in seen.message
