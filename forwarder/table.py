"""What the data plane knows of endpoints and their ready replicas: the routing table every
request looks its endpoint up in (`forwarder/refresh.load_table` reads it from SQLite).

Compiled with the fast lane (`setup.py`): these are native classes there, whose fields the
lane reads on every request as plain struct reads rather than instance dictionary lookups.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HEALTH_ROUTE = "/health"
DEFAULT_PREDICT_ROUTE = "/predict"


@dataclass(frozen=True)
class TargetReplica:
    id: str
    address: str


@dataclass(frozen=True)
class Target:
    """What the data plane needs to know about one endpoint."""

    endpoint_id: str
    name: str
    owner: str
    public: bool
    framework: str
    endpoint_type: str
    status: str
    replicas: tuple[TargetReplica, ...]
    health_route: str = DEFAULT_HEALTH_ROUTE
    predict_route: str = DEFAULT_PREDICT_ROUTE
    timeout_s: float | None = None  # per-endpoint upstream timeout; None: the api's setting
    max_concurrency: int | None = None  # per-replica cap; None: the api's setting


@dataclass(frozen=True)
class RoutingTable:
    by_name: dict[str, Target]
    by_id: dict[str, Target]

    @classmethod
    def empty(cls) -> RoutingTable:
        return cls({}, {})
