"""What the builder asks of the thing that runs replicas: the seam between the reconciler
(`builder/loop.py`, `builder/apply.py`, `builder/logs.py`) and a container runtime.

`builder/docker_engine.DockerEngine` implements it on one box. A runtime for a cluster
(Kubernetes: a Deployment or Pod per replica, labels as here) would implement the same
methods; `docs/scaling-out.md` says what each would map to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from builder.docker_engine import ContainerInfo, ImageInfo
from builder.specs import ContainerSpec


class ContainerRuntime(Protocol):
    """Runs replicas labelled with this install's id, and never touches anything else."""

    install_id: str

    def memory_bytes(self) -> int:
        """The memory of the machine replicas run on; the planner places replicas' memory
        limits in it (`builder/memory.py`)."""
        ...

    def list_managed(self) -> list[ContainerInfo]:
        """Every replica carrying this install's labels, running or not (the truth)."""
        ...

    def has_image(self, image: str) -> bool:
        """True when the image is there to start containers from."""
        ...

    def pull(self, image: str) -> Iterator[dict[str, Any]]:
        """Fetch the image, yielding the runtime's status messages as layers come (Docker's
        pull stream: `status`, `id`, `progressDetail`); raises `PullError` in the registry's
        words. Slow: the builder calls it from a background thread (`builder/pull.py`)."""
        ...

    def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start one replica; returns where it answers."""
        ...

    def inspect(self, container_id: str) -> dict[str, object]:
        """The runtime's own description, checked against the security policy."""
        ...

    def remove(self, container_id: str, *, stop_timeout_s: int = ...) -> None:
        """Stop (gracefully, up to the timeout) and delete one managed replica."""
        ...

    def logs_tail(self, container_id: str, lines: int = ...) -> str:
        """The last lines of a replica's output (kept when it crashes)."""
        ...

    def follow_logs(self, container_id: str, tail: int) -> Iterator[bytes]:
        """A replica's output as it comes, for the logs route."""
        ...

    def images(self, refs: list[str]) -> list[ImageInfo]:
        """Each named image as the runtime has it, absent ones too (read only)."""
        ...

    def remove_image(self, ref: str) -> list[str]:
        """Remove one image name, refused (ImageInUseError) while a container uses it."""
        ...

    def close(self) -> None: ...
