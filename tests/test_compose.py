"""The compose install, with the repository's compose.yaml alone on this GPU-less box: locally
built images come up healthy, a llama.cpp endpoint serves, and `docker compose down` leaves
nothing running."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    ADMIN_KEY,
    BASE_IMAGE,
    GEMMA_FILE,
    LLAMACPP_IMAGE,
    MODELS_DIR,
    free_port,
    wait_until,
)

ROOT = Path(__file__).parents[1]
APPLIANCE_IMAGE = os.environ.get("APPLIANCE_IMAGE", "model-engine-appliance:test")


def compose(project: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        "docker",
        "compose",
        "-p",
        project,
        "-f",
        str(ROOT / "compose.yaml"),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def stack(docker_ready: None) -> Iterator[tuple[str, dict[str, str], int]]:
    if (
        subprocess.run(
            ["docker", "image", "inspect", APPLIANCE_IMAGE], capture_output=True
        ).returncode
        != 0
    ):
        pytest.fail(f"{APPLIANCE_IMAGE} is missing: scripts/build-appliance-image builds it")
    project = f"appliance-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "APPLIANCE_IMAGE": APPLIANCE_IMAGE,
        "APPLIANCE_REDIS_IMAGE": BASE_IMAGE,
        "APPLIANCE_NETWORK": project,
        "APPLIANCE_MODELS_VOLUME": f"{project}-models",
        "APPLIANCE_HF_CACHE_VOLUME": f"{project}-hf",
        "APPLIANCE_PORT": str(port),
        "APPLIANCE_ADMIN_KEY": ADMIN_KEY,
        "APPLIANCE_LLAMACPP_IMAGE": LLAMACPP_IMAGE,
    }
    yield project, env, port
    down = compose(project, env, "down", "-v", "--timeout", "10")
    print(down.stdout, down.stderr)


def running(project: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={project}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def replicas_on(project: str, *flags: str) -> list[str]:
    """Ids of replica containers on the compose project's networks (`-a`: stopped ones too)."""
    found: list[str] = []
    for network in (project, f"{project}-replicas"):
        cmd = ["docker", "ps", "-q", *flags, "--filter", f"network={network}"]
        cmd += ["--filter", "label=appliance.endpoint"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        found += [c for c in out if c not in found]
    return found


def networks_of(container: str) -> list[str]:
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", container],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(json.loads(out))


def reaches(network: str, host: str, port: int) -> bool:
    """Whether a container on `network` can open a TCP connection to `host:port`, as code
    running in a replica could."""
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout=5).close()\n"
        "except OSError:\n"
        "    sys.exit(3)\n"
    )
    run = subprocess.run(
        ["docker", "run", "--rm", "--network", network, BASE_IMAGE, "python3", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode in (0, 3), run.stderr
    return run.returncode == 0


def client_for(port: int) -> httpx.Client:
    return httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        timeout=60,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )


def gemma_on_cpu(name: str) -> dict[str, object]:
    return {
        "name": name,
        "model_name": "gemma-3-270m",
        "inference_framework": "llamacpp",
        "checkpoint_path": GEMMA_FILE,
        "gpus": 0,
        "min_workers": 1,
        "max_workers": 1,
        "per_worker": 1,
        "labels": {},
        "metadata": {},
    }


def test_compose_up_is_healthy_and_down_leaves_nothing(
    stack: tuple[str, dict[str, str], int],
) -> None:
    project, env, port = stack
    up = compose(project, env, "up", "-d", "--no-build", "--wait", "--wait-timeout", "180")
    assert up.returncode == 0, up.stdout + up.stderr + compose(project, env, "logs").stdout

    states = compose(project, env, "ps", "--format", "json").stdout
    services = [json.loads(line) for line in states.splitlines() if line.strip()]
    health = {s["Service"]: s.get("Health") for s in services}
    assert health == {
        "redis": "healthy",
        "api": "healthy",
        "builder": "healthy",
        "worker": "healthy",
    }

    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    listed = httpx.get(
        f"http://127.0.0.1:{port}/v1/llm/model-endpoints",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=5,
    )
    assert listed.status_code == 200 and listed.json() == {"model_endpoints": []}
    unauthenticated = httpx.get(f"http://127.0.0.1:{port}/v1/llm/model-endpoints", timeout=5)
    assert unauthenticated.status_code == 401

    # no NVIDIA runtime here: the GPU agent cannot start, and the inventory says so
    gpus = client_for(port).get("/v1/gpus").json()
    assert gpus["gpus"] == [] and "GPU agent" in gpus["message"], gpus

    # the model file into the models volume, uploaded through the api
    with (MODELS_DIR / GEMMA_FILE).open("rb") as model:
        uploaded = client_for(port).put(f"/v1/storage/model-files/{GEMMA_FILE}", content=model)
    assert uploaded.status_code in (200, 201), uploaded.text
    # a replica started by the builder in its container joins the appliance's network
    client = client_for(port)
    created = client.post("/v1/llm/model-endpoints", json=gemma_on_cpu("in-compose"))
    assert created.status_code == 200, created.text
    wait_until(
        lambda: client.get("/v1/llm/model-endpoints/in-compose").json()["status"] == "READY",
        120,
        "the endpoint in compose",
    )
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "in-compose",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert chat.status_code == 200, chat.text
    (replica,) = replicas_on(project)
    # a replica runs code the appliance does not control (an approved image, a model's, an
    # exploit of a server's parser): its network reaches the api, never Redis, which holds
    # every team's tasks, logs and limits and asks for no password
    (network,) = networks_of(replica)
    assert reaches(network, "api", 8000)
    assert not reaches(network, "redis", 6379)
    assert network == f"{project}-replicas"
    # the operator's tools in the image, on the box: no URL or key needed
    exported = compose(project, env, "exec", "-T", "api", "appliance", "export")
    assert exported.returncode == 0 and "name: in-compose" in exported.stdout, exported.stderr
    where = "/var/lib/appliance/backup.tar.gz"
    backup = compose(project, env, "exec", "-T", "api", "appliance", "backup", where)
    assert backup.returncode == 0 and "written to" in backup.stdout, backup.stderr
    assert client.delete("/v1/llm/model-endpoints/in-compose").status_code == 200
    wait_until(lambda: replicas_on(project, "-a") == [], 60, "the replica to be removed")

    down = compose(project, env, "down", "-v", "--timeout", "10")
    assert down.returncode == 0, down.stderr
    assert running(project) == []


def test_every_service_keeps_bounded_logs() -> None:
    """Docker keeps a container's output in a file with no bound unless told one, and any
    client makes the api write a line (a malformed request is logged, with no key): each
    service's logs are capped, as the builder caps its replicas' (builder/specs.py)."""
    import yaml

    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        logging = service.get("logging") or {}
        assert logging.get("driver") == "json-file", (name, logging)
        assert logging.get("options", {}).get("max-size"), (name, logging)
        assert logging.get("options", {}).get("max-file"), (name, logging)


def test_every_setting_in_dot_env_reaches_every_role(tmp_path: Path) -> None:
    """The README's settings (a key's rate limit, approved images, a TLS proxy's address) are
    environment variables, but compose passed its roles only the few compose.yaml names: one
    set in `.env` beside it was read by nobody, without a word. Each role now gets them all;
    where the roles run inside their containers (port, paths, address) stays compose's own."""
    (tmp_path / "compose.yaml").write_text((ROOT / "compose.yaml").read_text())
    (tmp_path / ".env").write_text(
        "APPLIANCE_KEY_REQUESTS_PER_MINUTE=60\n"
        'APPLIANCE_FORWARDED_ALLOW_IPS=["10.0.0.5"]\n'
        "APPLIANCE_LOG_LEVEL=DEBUG\n"
        "APPLIANCE_PORT=9000\n"
        "APPLIANCE_HOST=127.0.0.1\n"
        "APPLIANCE_DATA_DIR=/srv/appliance\n"
        "APPLIANCE_MODELS_DIR=/srv/models\n"
    )
    done = subprocess.run(
        ["docker", "compose", "config", "--format", "json"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    services = json.loads(done.stdout)["services"]
    for role in ("api", "builder", "worker"):
        env = services[role]["environment"]
        assert env["APPLIANCE_KEY_REQUESTS_PER_MINUTE"] == "60", role
        assert env["APPLIANCE_FORWARDED_ALLOW_IPS"] == '["10.0.0.5"]', role
        assert env["APPLIANCE_LOG_LEVEL"] == "DEBUG", role
        assert env["APPLIANCE_PORT"] == "8000", role
        assert env["APPLIANCE_HOST"] == "0.0.0.0", role  # in its container
        assert env["APPLIANCE_DATA_DIR"] == "/var/lib/appliance", role
        assert env["APPLIANCE_MODELS_DIR"] == "/models", role
    assert [p["published"] for p in services["api"]["ports"]] == ["9000"]
    assert [p["target"] for p in services["api"]["ports"]] == [8000]
