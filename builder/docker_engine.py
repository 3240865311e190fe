"""The Docker adapter: the only module that imports `docker`. Used by the builder's loop only.

It lists, creates, inspects and removes containers that carry this install's labels, and never
acts on a container without them. It also reads the images it is asked about and removes one
by name when the builder's image keeper (`builder/images.py`) asks, refusing any image a
container (of any install, or none) still uses.
"""

from __future__ import annotations

import io
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.types import DeviceRequest, LogConfig
from docker.types import Mount as DockerMount
from docker.utils import parse_repository_tag

from builder.specs import LABEL_INSTALL, LABEL_NETWORK, LABEL_ROLE, ContainerSpec

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10


class DockerUnavailableError(RuntimeError):
    """The Docker Engine did not answer; the builder retries on its next tick."""


# What a Docker Engine that does not answer raises: docker-py's own errors, and the requests
# errors it lets through when its socket is gone or refuses (a dockerd restarting)
UNANSWERED = (docker.errors.DockerException, requests.RequestException)


class GpuAgentError(RuntimeError):
    """The GPU agent's container could not start: no NVIDIA container runtime, most often."""


class PullError(RuntimeError):
    """A pull failed; the message is the registry's (or the Docker Engine's) own words."""


class ContainerStartError(RuntimeError):
    """A replica's container could not be created or started; the Docker Engine's own words,
    and what they mean when they are terse."""


# The Docker Engine's words when a container asks for GPUs and it has no NVIDIA runtime
NO_GPU_RUNTIME = "could not select device driver"
NO_GPU_RUNTIME_MEANS = (
    "the Docker Engine has no NVIDIA container runtime to give GPUs: install NVIDIA's "
    "container toolkit on this box, or set APPLIANCE_DOCKER_GPU_RUNTIME=false where GPUs "
    "reach containers otherwise"
)


@dataclass(frozen=True)
class ContainerInfo:
    """What the builder needs to know about one managed container."""

    id: str
    name: str
    labels: dict[str, str]
    status: str  # created | running | restarting | exited | dead | paused
    exit_code: int
    address: str | None
    memory_bytes: int | None = None  # its memory limit; None: none set, or not known
    oom_killed: bool = False  # the kernel's OOM killer ended it (its memory limit reached)

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True)
class ImageInfo:
    """One image name as this box has it: its id and size, and how many containers (of any
    install, running or not) were created from it. `id` None: not on this box."""

    ref: str
    id: str | None
    size_bytes: int | None
    containers: int


class ImageInUseError(RuntimeError):
    """A container still uses the image; it is not removed."""


def _tar(path: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(posixpath.basename(path))
        info.size, info.mode = len(content), 0o600
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _words(exc: docker.errors.DockerException) -> str:
    """The Docker Engine's own explanation, without the HTTP wrapping."""
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


def _start_words(exc: docker.errors.DockerException) -> str:
    words = _words(exc)
    return f"{words} ({NO_GPU_RUNTIME_MEANS})" if NO_GPU_RUNTIME in words else words


def _address(container: Container, port: int | None, network: str | None) -> str | None:
    if port is None:
        return None
    if network:
        return f"http://{container.name}:{port}"
    bindings = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
    published = bindings.get(f"{port}/tcp") or []
    return f"http://127.0.0.1:{published[0]['HostPort']}" if published else None


def _info(container: Container) -> ContainerInfo:
    labels = dict(container.labels)
    state = container.attrs.get("State") or {}
    limit = int((container.attrs.get("HostConfig") or {}).get("Memory") or 0)
    port = labels.get("appliance.port")
    network = labels.get(LABEL_NETWORK) or None
    return ContainerInfo(
        id=container.id or "",
        name=container.name or "",
        labels=labels,
        status=str(state.get("Status", container.status)),
        exit_code=int(state.get("ExitCode") or 0),
        address=_address(container, int(port) if port else None, network),
        memory_bytes=limit or None,
        oom_killed=bool(state.get("OOMKilled")),
    )


class DockerEngine:
    """A thin, typed face over docker-py for the builder."""

    def __init__(self, base_url: str | None, install_id: str) -> None:
        self._base_url = base_url
        self._connected: docker.DockerClient | None = None
        self.install_id = install_id

    @property
    def _client(self) -> docker.DockerClient:
        """The loop's client, made on first use: a builder starts without a Docker Engine
        that answers, and every call until one does raises `DockerUnavailableError`."""
        if self._connected is None:
            self._connected = self._connect()
        return self._connected

    def _connect(self) -> docker.DockerClient:
        try:
            if self._base_url:
                return docker.DockerClient(base_url=self._base_url)
            return docker.from_env()
        except UNANSWERED as exc:
            raise DockerUnavailableError(str(exc)) from exc

    def close(self) -> None:
        if self._connected is not None:
            self._connected.close()

    def memory_bytes(self) -> int:
        """The memory of the machine the Docker Engine runs on (`docker info`'s MemTotal)."""
        try:
            return int(self._client.info()["MemTotal"])
        except UNANSWERED as exc:
            raise DockerUnavailableError(str(exc)) from exc

    def list_managed(self) -> list[ContainerInfo]:
        """Every container labelled with this install's id, running or not."""
        try:
            found = self._client.containers.list(
                all=True, filters={"label": f"{LABEL_INSTALL}={self.install_id}"}
            )
        except UNANSWERED as exc:
            raise DockerUnavailableError(str(exc)) from exc
        return [_info(c) for c in found if LABEL_ROLE not in c.labels]

    def ensure_gpu_agent(self, image: str, env: dict[str, str], network: str | None) -> None:
        """Start the GPU agent (`gpu/agent.py`) with every GPU, unless it already runs."""
        name = f"appliance-{self.install_id}-gpu-agent"
        try:
            self.remove_gpu_agent(only_stopped=True)
            if self._client.containers.list(filters={"name": f"^{name}$"}):
                return
            container = self._client.containers.create(
                image,
                command=["gpu-agent"],
                name=name,
                environment=env,
                labels={LABEL_INSTALL: self.install_id, LABEL_ROLE: "gpu-agent"},
                device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])],
                network=network,
                restart_policy={"Name": "unless-stopped"},  # type: ignore[arg-type]
                cap_drop=["ALL"],
                security_opt=["no-new-privileges:true"],
                pids_limit=64,
                mem_limit=256 * 1024**2,
                log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
            )
        except requests.RequestException as exc:  # no answer: not the agent's fault
            raise DockerUnavailableError(str(exc)) from exc
        except docker.errors.DockerException as exc:
            raise GpuAgentError(_words(exc)) from exc
        try:
            container.start()
        except docker.errors.DockerException as exc:
            container.remove(force=True)
            raise GpuAgentError(_words(exc)) from exc

    def remove_gpu_agent(self, *, only_stopped: bool = False) -> None:
        """Remove this install's GPU agent (a stopped one only, when asked)."""
        labels = [f"{LABEL_INSTALL}={self.install_id}", f"{LABEL_ROLE}=gpu-agent"]
        filters: dict[str, str | list[str] | bool] = {"label": labels}
        for container in self._client.containers.list(all=True, filters=filters):
            if not only_stopped or container.status != "running":
                container.remove(force=True)

    def has_image(self, image: str) -> bool:
        """True when the image is on this Docker Engine (a pull would not be needed)."""
        try:
            self._client.images.get(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except UNANSWERED as exc:
            raise DockerUnavailableError(str(exc)) from exc

    def pull(self, image: str) -> Iterator[dict[str, Any]]:
        """Pulls an image, yielding Docker's status messages (one per layer event) as they come.

        Runs on its own client, so a long pull shares no connection with the loop's calls.
        Raises `PullError` with the registry's own words when the pull fails.
        """
        repository, tag = parse_repository_tag(image)
        client = self._connect()
        try:
            stream = client.api.pull(repository, tag=tag or "latest", stream=True, decode=True)
            for message in stream:
                error = message.get("errorDetail", {}).get("message") or message.get("error")
                if error:
                    raise PullError(str(error))
                yield message
        except docker.errors.APIError as exc:
            raise PullError(str(exc.explanation or exc)) from exc
        except UNANSWERED as exc:
            raise PullError(f"the Docker Engine stopped answering: {exc}") from exc
        finally:
            client.close()

    def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Create and start a replica's container with the hardened host config."""
        labels = dict(spec.labels)
        labels["appliance.port"] = str(spec.port)
        labels[LABEL_NETWORK] = spec.network or ""
        mounts = [
            DockerMount(m.target, m.source, type=m.kind, read_only=m.read_only) for m in spec.mounts
        ]
        devices = (
            [DeviceRequest(device_ids=[str(i) for i in spec.gpu_ids], capabilities=[["gpu"]])]
            if spec.request_gpus
            else []
        )
        try:
            container = self._create(spec, labels, mounts, devices)
        except docker.errors.APIError as exc:
            raise ContainerStartError(_start_words(exc)) from exc
        try:
            for path, content in spec.files.items():  # secrets: in a file, never in the env
                container.put_archive(posixpath.dirname(path), _tar(path, content))
            container.start()
        except docker.errors.DockerException as exc:
            container.remove(force=True)
            if isinstance(exc, docker.errors.APIError):
                raise ContainerStartError(_start_words(exc)) from exc
            raise
        container.reload()
        return _info(container)

    def _create(
        self,
        spec: ContainerSpec,
        labels: dict[str, str],
        mounts: list[DockerMount],
        devices: list[DeviceRequest],
    ) -> Container:
        return self._client.containers.create(
            spec.image,
            command=list(spec.command),
            entrypoint=list(spec.entrypoint) if spec.entrypoint else None,
            name=spec.name,
            environment=spec.env,
            labels=labels,
            mounts=mounts,
            device_requests=devices,
            network=spec.network,
            ports=None if spec.network else {f"{spec.port}/tcp": ("127.0.0.1", None)},  # type: ignore[dict-item]
            privileged=False,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"],
            pids_limit=spec.pids_limit,
            mem_limit=spec.memory_bytes,
            nano_cpus=spec.nano_cpus,
            shm_size=spec.shm_bytes,
            log_config=LogConfig(type="json-file", config=spec.log_options),
        )

    def _managed(self, container_id: str) -> Container:
        container = self._client.containers.get(container_id)
        if container.labels.get(LABEL_INSTALL) != self.install_id:
            raise PermissionError(f"container {container_id} is not managed by this install")
        return container

    def inspect(self, container_id: str) -> dict[str, object]:
        return dict(self._managed(container_id).attrs)

    def remove(self, container_id: str, *, stop_timeout_s: int = STOP_TIMEOUT_S) -> None:
        """Stop and remove a managed container; a container already gone is fine."""
        try:
            container = self._managed(container_id)
            if container.status in {"running", "restarting", "paused"}:
                container.stop(timeout=stop_timeout_s)
            container.remove(force=True)
        except docker.errors.NotFound:
            return

    def logs_tail(self, container_id: str, lines: int = 30) -> str:
        try:
            raw = self._managed(container_id).logs(tail=lines, stdout=True, stderr=True)
        except docker.errors.NotFound:
            return ""
        return bytes(raw).decode("utf-8", "replace")

    def follow_logs(self, container_id: str, tail: int) -> Iterator[bytes]:
        stream = self._managed(container_id).logs(stream=True, follow=True, tail=tail)
        yield from stream

    def images(self, refs: list[str]) -> list[ImageInfo]:
        """Each named image as this box has it (absent ones too); reads only."""
        try:
            users: dict[str, int] = {}
            for container in self._client.containers.list(all=True, sparse=True):
                image_id = str(container.attrs.get("ImageID", ""))
                users[image_id] = users.get(image_id, 0) + 1
            return [self._image(ref, users) for ref in refs]
        except UNANSWERED as exc:
            raise DockerUnavailableError(str(exc)) from exc

    def _image(self, ref: str, users: dict[str, int]) -> ImageInfo:
        try:
            image = self._client.images.get(ref)
        except docker.errors.NotFound:
            return ImageInfo(ref, None, None, 0)
        except docker.errors.APIError as exc:
            if exc.status_code is not None and exc.status_code < 500:  # not a reference at all
                return ImageInfo(ref, None, None, 0)
            raise
        size = int(image.attrs.get("Size") or 0)
        return ImageInfo(ref, image.id, size, users.get(image.id or "", 0))

    def remove_image(self, ref: str) -> list[str]:
        """Remove the name `ref` (the image itself when it was its last name), unless a
        container uses the image; returns what Docker did ("untagged ...", "deleted ...")."""
        found = self.images([ref])[0]
        if found.id is None:
            return []
        if found.containers:
            raise ImageInUseError(f"{found.containers} container(s) use {ref}")
        try:
            done = self._client.api.remove_image(ref, force=False, noprune=False)
        except docker.errors.NotFound:
            return []
        except docker.errors.APIError as exc:
            if exc.status_code == 409:  # a container was created from it meanwhile
                raise ImageInUseError(str(exc.explanation or exc)) from exc
            raise
        return [f"{kind.lower()} {what}" for item in done or [] for kind, what in item.items()]
