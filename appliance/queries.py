"""Queries shared by the roles; each takes a keyword-only session and does no other I/O."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import text
from sqlmodel import Session, col, func, select
from sqlmodel.sql.expression import SelectOfScalar

from appliance.caller import Caller
from appliance.errors import NoSuchEndpointError
from appliance.models import Endpoint, Event, Replica, Task, TaskStatus

Row = TypeVar("Row")


def of_team(query: SelectOfScalar[Row], owner: Any, caller: Caller) -> SelectOfScalar[Row]:
    """`query` narrowed to the rows of the caller's team (every row for an admin key): the
    list form of `Caller.owns`."""
    return query if caller.is_admin else query.where(owner == caller.team)


# The newest events an endpoint keeps: the most its readers can page (the events route's
# `limit`); older ones are dropped as new ones come, so the builder's events for an endpoint
# that lives for months (scaling to zero and back, a crash-loop) do not grow without end
EVENTS_KEPT_PER_ENDPOINT = 1000
_DROP_OLD_EVENTS = text(
    "DELETE FROM event WHERE endpoint_id = :endpoint AND id < ("
    "SELECT id FROM event WHERE endpoint_id = :endpoint ORDER BY id DESC "
    "LIMIT 1 OFFSET :kept)"
)


def add_event(endpoint_id: str, kind: str, message: str, *, session: Session) -> None:
    """The event, and the endpoint's oldest dropped past EVENTS_KEPT_PER_ENDPOINT."""
    session.add(Event(endpoint_id=endpoint_id, kind=kind, message=message, at=time.time()))
    session.flush()
    drop = {"endpoint": endpoint_id, "kept": EVENTS_KEPT_PER_ENDPOINT - 1}
    session.connection().execute(_DROP_OLD_EVENTS, drop)


def list_events(endpoint_id: str, *, session: Session, limit: int = 200) -> Sequence[Event]:
    query = (
        select(Event)
        .where(Event.endpoint_id == endpoint_id)
        .order_by(col(Event.id).desc())
        .limit(limit)
    )
    return list(reversed(session.exec(query).all()))


def endpoint_by_id(endpoint_id: str, *, session: Session) -> Endpoint:
    endpoint = session.get(Endpoint, endpoint_id)
    if endpoint is None:
        raise NoSuchEndpointError(f"no endpoint with id {endpoint_id!r}")
    return endpoint


def endpoint_by_name(name: str, *, session: Session) -> Endpoint:
    endpoint = session.exec(select(Endpoint).where(Endpoint.name == name)).first()
    if endpoint is None:
        raise NoSuchEndpointError(f"no endpoint named {name!r}")
    return endpoint


def all_endpoints(*, session: Session) -> Sequence[Endpoint]:
    return session.exec(select(Endpoint).order_by(col(Endpoint.created_at))).all()


def all_replicas(*, session: Session) -> Sequence[Replica]:
    return session.exec(select(Replica).order_by(col(Replica.created_at))).all()


def replicas_of(endpoint_id: str, *, session: Session) -> Sequence[Replica]:
    query = select(Replica).where(Replica.endpoint_id == endpoint_id)
    return session.exec(query.order_by(col(Replica.created_at))).all()


def queued_tasks(endpoint_id: str, *, session: Session) -> int:
    """The endpoint's async tasks waiting for a worker (not yet started)."""
    query = select(func.count()).where(
        Task.endpoint_id == endpoint_id, Task.status == TaskStatus.PENDING
    )
    return int(session.exec(query).one())
