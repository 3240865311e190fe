"""Shared fixtures: real Redis, real appliance processes, the Docker Engine and the test model."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness import BASE_IMAGE, BUILD, COMPILED, Appliance, RedisServer, have_docker

REQUIRE_DOCKER = os.environ.get("APPLIANCE_TEST_REQUIRE_DOCKER") == "1"
ROOT = Path(__file__).resolve().parents[1]


# The longest modules, run first: `scripts/test` runs pytest-xdist with one module per worker
# at a time (--dist loadfile), and a long module handed out last would make the run's tail.
SLOW_FIRST = (
    "tests/e2e/test_vllm_real.py",
    "tests/e2e/test_weights.py",
    "tests/e2e/test_async_gemma.py",
    "tests/e2e/test_pulls.py",
    "tests/api/test_schema.py",
    "tests/api/test_workers.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the rest is kept


def pytest_sessionstart(session: pytest.Session) -> None:
    """The compiled build (scripts/compile) is a copy of the sources: refuse to test a stale
    one."""
    if BUILD != "compiled":
        return
    if not COMPILED.exists():
        pytest.exit("APPLIANCE_TEST_BUILD=compiled, but there is no build: run scripts/compile")
    check = subprocess.run(
        [str(ROOT / "scripts/compile"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    if check.returncode != 0:
        pytest.exit(check.stderr.strip(), returncode=2)


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


@pytest.fixture(scope="session")
def canaries(docker_ready: None) -> Iterator[dict[str, tuple[str, str]]]:
    """Two containers the appliance must never touch: one unlabelled, one of another install.

    Every Docker test runs with them alive; at the end of the session each must still have the
    id and start time it began with."""
    made: dict[str, tuple[str, str]] = {}
    for name, labels in (("unlabelled", []), ("foreign", ["--label", "appliance.install=other"])):
        run = subprocess.run(
            [
                "docker",
                "run",
                "-d",
                "--name",
                f"canary-{name}-{uuid.uuid4().hex[:6]}",
                *labels,
                BASE_IMAGE,
                "sleep",
                "infinity",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        cid = run.stdout.strip()
        made[name] = (cid, started_at(cid))
    yield made
    try:
        for name, (cid, started) in made.items():
            assert started_at(cid) == started, f"the {name} canary was restarted or replaced"
    finally:
        subprocess.run(["docker", "rm", "-f", *(c for c, _ in made.values())], capture_output=True)


def started_at(container_id: str) -> str:
    probe = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Running}} {{.State.StartedAt}}", container_id],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else "gone"


@contextmanager
def appliances(base: Path) -> Iterator[Callable[..., Appliance]]:
    """Start appliances (api + builder) with their own Redis; all are stopped and cleaned after."""
    made: list[tuple[Appliance, RedisServer]] = []

    def make(**env: str) -> Appliance:
        index = len(made)
        redis = RedisServer(base / f"redis{index}").start()
        appliance = Appliance(base / f"appliance{index}", redis, env_extra=env)
        made.append((appliance, redis))
        return appliance.start()

    try:
        yield make
    finally:
        for appliance, redis in made:
            print(appliance.logs())  # shown by pytest only when the test failed
            appliance.stop()
            redis.stop()


@pytest.fixture
def make_appliance(
    tmp_path: Path, docker_ready: None, canaries: dict[str, tuple[str, str]]
) -> Iterator[Callable[..., Appliance]]:
    """Appliances for one test."""
    with appliances(tmp_path) as make:
        yield make


@pytest.fixture
def appliance(make_appliance: Callable[..., Appliance]) -> Appliance:
    return make_appliance()


@pytest.fixture
def api_only(tmp_path: Path) -> Iterator[Appliance]:
    """The api alone, on real Redis and SQLite: for tests that need no container."""
    redis = RedisServer(tmp_path / "redis-api").start()
    appliance = Appliance(tmp_path / "api-only", redis).start(roles=("api",))
    yield appliance
    print(appliance.logs())
    appliance.stop()
    redis.stop()


@pytest.fixture(scope="module")
def make_module_appliance(
    tmp_path_factory: pytest.TempPathFactory,
    docker_ready: None,
    canaries: dict[str, tuple[str, str]],
) -> Iterator[Callable[..., Appliance]]:
    """`make_appliance` shared by the tests of one module: endpoints cost seconds to start,
    so a module starts its appliance and endpoints once. Stopped and cleaned after the module."""
    with appliances(tmp_path_factory.mktemp("module-appliance")) as make:
        yield make
