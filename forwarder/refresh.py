"""The api's in-memory routing table (`forwarder/table.py`), read from SQLite: endpoints by
name and id with their ready replicas.

Built by a background refresher (on the builder's announcements and every few seconds), so no
request reads the database or asks Docker.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from appliance import queries
from appliance.db import session_scope
from appliance.models import Endpoint, EndpointStatus, ReplicaState
from forwarder.table import (
    DEFAULT_HEALTH_ROUTE,
    DEFAULT_PREDICT_ROUTE,
    RoutingTable,
    Target,
    TargetReplica,
)


def _positive(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def target_of(endpoint: Endpoint, replicas: tuple[TargetReplica, ...]) -> Target:
    """An endpoint row as the data plane sees it; optional knobs come from its `extra`."""
    extra = endpoint.extra or {}
    cap = _positive(extra.get("forwarder_max_concurrency"))
    return Target(
        endpoint_id=endpoint.id,
        name=endpoint.name,
        owner=endpoint.owner,
        public=endpoint.public_inference,
        framework=endpoint.framework,
        endpoint_type=endpoint.endpoint_type,
        status=endpoint.status,
        replicas=replicas,
        health_route=endpoint.health_route or DEFAULT_HEALTH_ROUTE,
        predict_route=str(extra.get("predict_route") or DEFAULT_PREDICT_ROUTE),
        timeout_s=_positive(extra.get("timeout_seconds")),
        max_concurrency=int(cap) if cap else None,
        status_reason=endpoint.status_reason or "",
        created_at=endpoint.created_at,
        max_replicas=endpoint.max_replicas,
    )


def load_table(engine: Engine) -> RoutingTable:
    """Read every endpoint and its ready replicas; runs in a worker thread. An endpoint being
    deleted routes no new request (its replicas drain what they have), so it is refused at
    once (`table.check_coming`) from the delete on, not once the builder stops its replicas."""
    with session_scope(engine) as session:
        endpoints = queries.all_endpoints(session=session)
        replicas = queries.all_replicas(session=session)
    deleting = {e.id for e in endpoints if e.status == EndpointStatus.DELETE_IN_PROGRESS}
    ready: dict[str, list[TargetReplica]] = {}
    for replica in replicas:
        if replica.endpoint_id in deleting:
            continue
        if replica.state == ReplicaState.READY and replica.address:
            ready.setdefault(replica.endpoint_id, []).append(
                TargetReplica(replica.id, replica.address)
            )
    routes = [target_of(e, tuple(ready.get(e.id, ()))) for e in endpoints]
    return RoutingTable({r.name: r for r in routes}, {r.endpoint_id: r for r in routes})
