"""What the reconciler's planner sees in one tick (`Observed`) and what it decides (`Action`):
plain values, so `builder/reconcile.py` plans without I/O and `builder/apply.py` carries the
actions out against Docker and SQLite."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from appliance.models import Endpoint, EndpointStatus, Replica
from builder.docker_engine import ContainerInfo
from builder.prepare import Readiness
from gpu.inventory import Inventory


@dataclass(frozen=True)
class Observed:
    """Everything the planner sees in one tick."""

    endpoints: Sequence[Endpoint]
    replicas: Sequence[Replica]
    containers: Sequence[ContainerInfo]
    healthy: Mapping[str, bool]  # replica id -> /health answered 200 just now
    inflight: Mapping[str, int]  # replica id -> requests the api and workers have in flight to it
    first_seen: Mapping[str, float]  # container id -> when the builder first saw it
    inventory: Inventory
    now: float
    preparing: Mapping[str, Readiness] = field(default_factory=dict)  # endpoint id -> wait
    last_lines: Mapping[str, str] = field(default_factory=dict)  # starting replica -> its output
    # what the replicas' memory limits may add up to (`builder/memory.py`); None: no bound
    memory_bytes: int | None = None
    # the network replicas join now (APPLIANCE_REPLICA_NETWORK); None: they publish ports
    replica_network: str | None = None


@dataclass(frozen=True)
class StartReplica:
    endpoint_id: str
    gpu_ids: tuple[int, ...]
    gpu_fraction: float


@dataclass(frozen=True)
class AdoptContainer:
    replica_id: str
    container_id: str
    address: str | None


@dataclass(frozen=True)
class MarkReady:
    replica_id: str


@dataclass(frozen=True)
class FailReplica:
    replica_id: str
    reason: str
    crashed: bool = True


@dataclass(frozen=True)
class DrainReplica:
    replica_id: str
    why: str


@dataclass(frozen=True)
class RemoveReplica:
    replica_id: str


@dataclass(frozen=True)
class RemoveOrphan:
    container_id: str


@dataclass(frozen=True)
class SetStatus:
    endpoint_id: str
    generation: int
    status: EndpointStatus
    reason: str | None
    event: bool = True  # False for a progress update: an event per tick would drown the rest


@dataclass(frozen=True)
class DeleteEndpoint:
    endpoint_id: str


@dataclass(frozen=True)
class SetDesired:
    """The scaler's (or an eviction's) new replica count for an endpoint, and why."""

    endpoint_id: str
    desired: int
    reason: str


# The status_reason of an endpoint the builder cannot act on while the Docker Engine is away
DOCKER_WAIT = "waiting for the Docker Engine, which is unavailable"


def docker_wait(error: str) -> str:
    return f"{DOCKER_WAIT}: {error}; the change is carried out once it answers"


@dataclass(frozen=True)
class SayDockerWait:
    """The endpoints waiting on the builder (UPDATE_PENDING, UPDATE_IN_PROGRESS,
    DELETE_IN_PROGRESS) say, in their status_reason, that it waits for the Docker Engine
    (`docker_wait`), their status unchanged; `reason` None: Docker answers again, and a reason
    that said so is cleared (the planner writes the next one)."""

    reason: str | None


@dataclass(frozen=True)
class NoteLastRequest:
    """When the endpoint last got a request (the GET's `deployment_state.last_request_at`),
    written by the scaler at most every `loop.LAST_REQUEST_WRITE_S` per endpoint."""

    endpoint_id: str
    at: float


Action = (
    StartReplica
    | AdoptContainer
    | MarkReady
    | FailReplica
    | DrainReplica
    | RemoveReplica
    | RemoveOrphan
    | SetStatus
    | DeleteEndpoint
    | SetDesired
    | NoteLastRequest
    | SayDockerWait
)
