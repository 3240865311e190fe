"""A replica's container that the Docker Engine refuses to start: the builder is told in the
Engine's own words, without the HTTP wrapping, and what they mean when they are terse."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from builder.docker_engine import DockerEngine
from builder.specs import LABEL_INSTALL, ContainerSpec
from tests.harness import BASE_IMAGE


def test_a_gpu_replica_on_an_engine_without_the_nvidia_runtime_says_what_to_install(
    docker_ready: None,
) -> None:
    runtimes = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "nvidia" in runtimes:
        pytest.skip("this Docker Engine has the NVIDIA runtime")
    install = f"t{uuid.uuid4().hex[:11]}"
    spec = ContainerSpec(
        name=f"appliance-{install}-gpu-start",
        image=BASE_IMAGE,
        command=("sleep", "60"),
        entrypoint=None,
        env={},
        port=8000,
        health_route="/health",
        mounts=(),
        labels={LABEL_INSTALL: install},
        gpu_ids=(0,),
        request_gpus=True,
        nano_cpus=10**9,
        memory_bytes=256 * 2**20,
        shm_bytes=64 * 2**20,
        network=None,
    )
    docker = DockerEngine(None, install)
    try:
        with pytest.raises(RuntimeError) as refused:
            docker.create(spec)
        words = str(refused.value)
        assert "could not select device driver" in words
        assert "install NVIDIA's container toolkit" in words
        assert "http+docker" not in words and "Server Error" not in words
        assert docker.list_managed() == []  # the refused container is not left behind
    finally:
        docker.close()
