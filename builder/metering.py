"""Replica time in the usage table: each replica's running time, and that times its GPUs
(GPU-seconds), per hour, charged to its endpoint's team. The builder's loop accrues every
replica every ACCRUE_EVERY_S; the applier settles a replica's last stretch before it deletes
the row or marks it failed, so no running time is lost or counted twice (each replica row
remembers how far it is accounted).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlmodel import Session

from appliance import usage
from appliance.models import Endpoint, Replica, ReplicaState

ACCRUE_EVERY_S = 60.0
RUNNING = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY, ReplicaState.STOPPING)


def gpu_share(replica: Replica) -> float:
    """The GPUs a replica holds: a fraction of one when it shares it."""
    return len(replica.gpus) * (replica.gpu_fraction or 1.0)


def pieces(replica: Replica, endpoint: Endpoint, now: float) -> list[usage.Counts]:
    """The replica's time not yet accounted, up to `now`, cut into hours."""
    start = replica.accounted_at or replica.created_at
    share = gpu_share(replica)
    model = usage.endpoint_model(endpoint)
    return [
        usage.Counts(
            hour,
            endpoint.owner,
            "",
            endpoint.name,
            model,
            replica_seconds=seconds,
            gpu_seconds=seconds * share,
        )
        for hour, seconds in usage.hour_pieces(start, now)
    ]


def settle(session: Session, replicas: Iterable[Replica], now: float) -> None:
    """Add the running replicas' time up to `now` to the usage table and mark it accounted,
    in the session's transaction."""
    rows: list[usage.Counts] = []
    endpoints: dict[str, Endpoint | None] = {}
    for replica in replicas:
        if replica.state not in RUNNING:
            continue
        if replica.endpoint_id not in endpoints:
            endpoints[replica.endpoint_id] = session.get(Endpoint, replica.endpoint_id)
        endpoint = endpoints[replica.endpoint_id]
        if endpoint is None:
            continue
        rows += pieces(replica, endpoint, now)
        replica.accounted_at = now
        session.add(replica)
    if rows:
        usage.add(usage.driver(session), rows)
