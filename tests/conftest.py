"""Shared fixtures: real Redis, real appliance processes, the Docker Engine and the test model."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Appliance, RedisServer, have_docker

REQUIRE_DOCKER = os.environ.get("APPLIANCE_TEST_REQUIRE_DOCKER") == "1"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """Skips Docker tests where Docker is absent, except under the test script, where it fails."""
    why = have_docker()
    if why is not None:
        if REQUIRE_DOCKER:
            pytest.fail(f"Docker tests cannot run: {why}")
        pytest.skip(why)


@pytest.fixture
def make_appliance(
    tmp_path: Path, docker_ready: None
) -> Iterator[Callable[..., Appliance]]:
    """Start appliances (api + builder) with their own Redis; all are stopped and cleaned after."""
    made: list[tuple[Appliance, RedisServer]] = []

    def make(**env: str) -> Appliance:
        index = len(made)
        redis = RedisServer(tmp_path / f"redis{index}").start()
        appliance = Appliance(tmp_path / f"appliance{index}", redis, env_extra=env)
        made.append((appliance, redis))
        return appliance.start()

    yield make
    for appliance, redis in made:
        print(appliance.logs())  # shown by pytest only when the test failed
        appliance.stop()
        redis.stop()


@pytest.fixture
def appliance(make_appliance: Callable[..., Appliance]) -> Appliance:
    return make_appliance()
