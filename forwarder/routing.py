"""The api's in-memory routing table: endpoints by name and id with their ready replicas.

Built from SQLite by a background refresher (on the builder's announcements and every few
seconds), so no request reads the database or asks Docker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from appliance import queries
from appliance.db import session_scope
from appliance.models import ReplicaState


@dataclass(frozen=True)
class ReplicaRoute:
    id: str
    address: str


@dataclass(frozen=True)
class Route:
    """What the data plane needs to know about one endpoint."""

    endpoint_id: str
    name: str
    owner: str
    public: bool
    framework: str
    endpoint_type: str
    status: str
    replicas: tuple[ReplicaRoute, ...]


@dataclass(frozen=True)
class RoutingTable:
    by_name: Mapping[str, Route]
    by_id: Mapping[str, Route]

    @classmethod
    def empty(cls) -> RoutingTable:
        return cls({}, {})


def load_routes(engine: Engine) -> RoutingTable:
    """Read every endpoint and its ready replicas; runs in a worker thread."""
    with session_scope(engine) as session:
        endpoints = queries.all_endpoints(session=session)
        replicas = queries.all_replicas(session=session)
    ready: dict[str, list[ReplicaRoute]] = {}
    for replica in replicas:
        if replica.state == ReplicaState.READY and replica.address:
            ready.setdefault(replica.endpoint_id, []).append(
                ReplicaRoute(replica.id, replica.address)
            )
    routes = [
        Route(
            endpoint_id=e.id,
            name=e.name,
            owner=e.owner,
            public=e.public_inference,
            framework=e.framework,
            endpoint_type=e.endpoint_type,
            status=e.status,
            replicas=tuple(ready.get(e.id, ())),
        )
        for e in endpoints
    ]
    return RoutingTable({r.name: r for r in routes}, {r.endpoint_id: r for r in routes})
