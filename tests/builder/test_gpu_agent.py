"""The GPU agent's round trip: what it publishes is what the builder reads; where its container
cannot start (no NVIDIA runtime), the builder sees no GPUs and a message that says why."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from appliance.settings import Settings
from builder.docker_engine import DockerEngine, GpuAgentError
from builder.gpu_agent import AgentGpuSource
from builder.serve import _gpu_source
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


def test_the_agent_joins_the_network_that_reaches_redis() -> None:
    """In compose, replicas have a network without Redis; the agent writes to Redis, so it
    joins the appliance's network where one is named, and the replicas' one otherwise."""
    docker: DockerEngine = Engine()  # type: ignore[assignment]
    client = redis.Redis()  # not connected: only the choice of network is read
    both = Settings(
        gpu_agent_image="appliance:test",
        replica_network="appliance-replicas",
        gpu_agent_network="appliance",
    )
    agent_source = _gpu_source(both, docker, client)[1]
    assert agent_source is not None and agent_source.network == "appliance"
    one = Settings(gpu_agent_image="appliance:test", replica_network="appliance-replicas")
    agent_source = _gpu_source(one, docker, client)[1]
    assert agent_source is not None and agent_source.network == "appliance-replicas"
