"""Applies the planner's actions one at a time: Docker calls, then a short SQLite transaction.

No Docker call ever runs inside a transaction; every action is idempotent, so a builder killed
half-way repeats or skips it safely on its next tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import col, delete, update

from appliance import queries
from appliance.db import session_scope
from appliance.errors import PolicyViolationError
from appliance.ids import new_id
from appliance.install import key_secret
from appliance.models import Endpoint, EndpointStatus, Event, Replica, ReplicaState
from appliance.settings import Settings
from builder import metering, policy
from builder.actions import (
    DOCKER_WAIT,
    Action,
    AdoptContainer,
    DeleteEndpoint,
    DrainReplica,
    FailReplica,
    MarkReady,
    NoteLastRequest,
    RemoveOrphan,
    RemoveReplica,
    SayDockerWait,
    SetDesired,
    SetStatus,
    StartReplica,
)
from builder.docker_engine import ContainerInfo
from builder.runtime import ContainerRuntime
from builder.specs import ContainerSpec, container_spec

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
WAITING_ON_BUILDER = (
    EndpointStatus.UPDATE_PENDING,
    EndpointStatus.UPDATE_IN_PROGRESS,
    EndpointStatus.DELETE_IN_PROGRESS,
)


@dataclass
class Applier:
    """Carries out actions against Docker and the database; tells the api when routes change."""

    engine: Engine
    docker: ContainerRuntime
    settings: Settings
    on_routes_changed: Callable[[], None]

    def allowed_sources(self) -> set[str]:
        if self.settings.models_volume:
            sources = {self.settings.models_volume}
        else:
            sources = {str(self.settings.models_source_dir.resolve())}
        return sources | self.writable_sources()

    def writable_sources(self) -> set[str]:
        """The Hugging Face cache: vLLM replicas write their compiled kernels and locks there."""
        return {self.settings.hf_cache_volume or str(self.settings.hf_cache_path.resolve())}

    def apply(self, action: Action) -> None:
        handler: Callable[[Any], None] = getattr(self, f"_{type(action).__name__}")
        handler(action)

    def _StartReplica(self, action: StartReplica) -> None:
        with session_scope(self.engine) as session:
            endpoint = queries.endpoint_by_id(action.endpoint_id, session=session)
            replica_id = new_id("rep")
            spec = container_spec(
                endpoint,
                settings=self.settings,
                install_id=self.docker.install_id,
                replica_id=replica_id,
                gpu_ids=action.gpu_ids,
                gpu_fraction=action.gpu_fraction,
                key_secret=key_secret(self.settings.data_dir),
            )
            session.add(
                Replica(
                    id=replica_id,
                    endpoint_id=endpoint.id,
                    generation=endpoint.generation,
                    container_name=spec.name,
                    gpus=list(action.gpu_ids),
                    gpu_fraction=action.gpu_fraction,
                    state=ReplicaState.STARTING,
                )
            )
            where = f"GPUs {list(action.gpu_ids)}" if action.gpu_ids else "CPU"
            queries.add_event(
                endpoint.id, "placed", f"replica {replica_id} placed on {where}", session=session
            )
            # checked again at start: a row stored before a rule was added still meets it
            flags = dict(endpoint.args.get("extra_flags") or {})
        try:
            policy.check_extra_flags(flags)
            info = self._create(action.endpoint_id, spec)
        except Exception as exc:
            logger.warning(
                "replica %s of %s failed to start: %s", replica_id, action.endpoint_id, exc
            )
            self._FailReplica(FailReplica(replica_id, f"failed to start: {exc}"))
            return
        with session_scope(self.engine) as session:
            session.exec(
                update(Replica)
                .where(col(Replica.id) == replica_id)
                .values(container_id=info.id, address=info.address)
            )
            queries.add_event(
                action.endpoint_id,
                "started",
                f"replica {replica_id} started as {info.name}",
                session=session,
            )

    def _create(self, endpoint_id: str, spec: ContainerSpec) -> ContainerInfo:
        sources, writable = self.allowed_sources(), self.writable_sources()
        policy.check_spec(spec, allowed_sources=sources, writable=writable)
        info = self.docker.create(spec)
        broken = policy.violations(
            self.docker.inspect(info.id), allowed_sources=sources, writable=writable
        )
        if broken:
            self.docker.remove(info.id, stop_timeout_s=0)
            raise PolicyViolationError(f"container broke the policy: {broken}")
        return info

    def _AdoptContainer(self, action: AdoptContainer) -> None:
        with session_scope(self.engine) as session:
            session.exec(
                update(Replica)
                .where(col(Replica.id) == action.replica_id)
                .values(container_id=action.container_id, address=action.address)
            )
        self.on_routes_changed()  # a replica restarted on another port is reached there now

    def _MarkReady(self, action: MarkReady) -> None:
        now = time.time()
        with session_scope(self.engine) as session:
            replica = session.get(Replica, action.replica_id)
            if replica is None:
                return
            replica.state, replica.ready_at, replica.state_since = ReplicaState.READY, now, now
            queries.add_event(
                replica.endpoint_id, "ready", f"replica {replica.id} is ready", session=session
            )
        self.on_routes_changed()

    def _FailReplica(self, action: FailReplica) -> None:
        with session_scope(self.engine) as session:
            replica = session.get(Replica, action.replica_id)
        if replica is None:
            return
        tail = (
            self.docker.logs_tail(replica.container_id, LOG_TAIL_LINES)
            if (replica.container_id)
            else ""
        )
        if replica.container_id:
            self.docker.remove(replica.container_id, stop_timeout_s=0)
        with session_scope(self.engine) as session:
            row = session.get(Replica, action.replica_id)
            if row is None:
                return
            metering.settle(session, [row], time.time())  # its container is gone now
            if not action.crashed:
                session.delete(row)
                return
            row.state, row.state_since = ReplicaState.FAILED, time.time()
            row.last_error, row.log_tail, row.gpus = action.reason, tail[-4000:] or None, []
            queries.add_event(
                row.endpoint_id, "crashed", f"replica {row.id}: {action.reason}", session=session
            )
        self.on_routes_changed()

    def _DrainReplica(self, action: DrainReplica) -> None:
        with session_scope(self.engine) as session:
            replica = session.get(Replica, action.replica_id)
            if replica is None or replica.state == ReplicaState.STOPPING:
                return
            replica.state, replica.state_since = ReplicaState.STOPPING, time.time()
            queries.add_event(
                replica.endpoint_id,
                "draining",
                f"replica {replica.id} draining: {action.why}",
                session=session,
            )
        self.on_routes_changed()

    def _RemoveReplica(self, action: RemoveReplica) -> None:
        with session_scope(self.engine) as session:
            replica = session.get(Replica, action.replica_id)
        if replica is None:
            return
        if replica.container_id:
            self.docker.remove(replica.container_id)
        with session_scope(self.engine) as session:
            row = session.get(Replica, action.replica_id)
            if row is not None:
                metering.settle(session, [row], time.time())
                session.delete(row)
                queries.add_event(
                    row.endpoint_id, "removed", f"replica {row.id} removed", session=session
                )
        self.on_routes_changed()

    def _RemoveOrphan(self, action: RemoveOrphan) -> None:
        logger.warning(
            "removing container %s: labelled by this install, no replica row", action.container_id
        )
        self.docker.remove(action.container_id)

    def _SetStatus(self, action: SetStatus) -> None:
        with session_scope(self.engine) as session:
            result = session.exec(
                update(Endpoint)
                .where(col(Endpoint.id) == action.endpoint_id)
                .where(col(Endpoint.generation) == action.generation)
                .where(col(Endpoint.status) != EndpointStatus.DELETE_IN_PROGRESS)
                .values(status=action.status, status_reason=action.reason)
            )
            if result.rowcount and action.event:
                message = action.status.value + (f": {action.reason}" if action.reason else "")
                queries.add_event(action.endpoint_id, "status", message, session=session)

    def _SetDesired(self, action: SetDesired) -> None:
        with session_scope(self.engine) as session:
            endpoint = session.get(Endpoint, action.endpoint_id)
            if endpoint is None or endpoint.desired_replicas == action.desired:
                return
            endpoint.desired_replicas = action.desired
            queries.add_event(endpoint.id, "scaled", action.reason, session=session)

    def _NoteLastRequest(self, action: NoteLastRequest) -> None:
        with session_scope(self.engine) as session:  # the column alone: no event, no update time
            session.exec(
                update(Endpoint)
                .where(col(Endpoint.id) == action.endpoint_id)
                .values(last_request_at=action.at)
            )

    def _SayDockerWait(self, action: SayDockerWait) -> None:
        with session_scope(self.engine) as session:
            for endpoint in queries.all_endpoints(session=session):
                said = (endpoint.status_reason or "").startswith(DOCKER_WAIT)
                if endpoint.status not in WAITING_ON_BUILDER or said == (action.reason is not None):
                    continue  # READY and UPDATE_FAILED keep theirs; one line a wait, not a tick
                endpoint.status_reason = action.reason
                session.add(endpoint)
                if action.reason is not None:
                    message = f"{endpoint.status}: {action.reason}"
                    queries.add_event(endpoint.id, "status", message, session=session)

    def _DeleteEndpoint(self, action: DeleteEndpoint) -> None:
        with session_scope(self.engine) as session:
            left = queries.replicas_of(action.endpoint_id, session=session)
            metering.settle(session, left, time.time())
            session.exec(delete(Replica).where(col(Replica.endpoint_id) == action.endpoint_id))
            session.exec(delete(Event).where(col(Event.endpoint_id) == action.endpoint_id))
            session.exec(delete(Endpoint).where(col(Endpoint.id) == action.endpoint_id))
        self.on_routes_changed()
