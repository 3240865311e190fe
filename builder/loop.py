"""The builder's loop: observe rows, containers and health; plan; apply; wait for a nudge.

Run by `appliance builder`; the only process that talks to Docker and NVML.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import redis
from sqlalchemy.engine import Engine

from appliance import bus, queries
from appliance.db import session_scope
from appliance.install import key_secret
from appliance.models import EndpointStatus, Replica, ReplicaState
from builder import memory, metering
from builder.actions import (
    NoteLastRequest,
    Observed,
    SayDockerWait,
    SetDesired,
    SetStatus,
    docker_wait,
)
from builder.apply import Applier
from builder.docker_engine import DockerUnavailableError
from builder.hub_downloads import HubDownloads
from builder.images import ImageKeeper
from builder.load import gather
from builder.logs import LogShipper
from builder.prepare import Note, Preparer, Readiness, Waiting
from builder.reconcile import plan
from builder.runtime import ContainerRuntime
from builder.scale import History, Load, decide
from builder.specs import server_command
from builder.starting import StartingLogs
from gpu.inventory import GpuSource

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 1.0
INVENTORY_REFRESH_S = 10.0
# The last request's time is written to the endpoint's row when it moved on this much: the
# GET shows it, to the write's granularity; the scaler reads Redis's own, to the tick
LAST_REQUEST_WRITE_S = 30.0


def probe(address: str, route: str) -> bool:
    """True when the replica's health route answers 200 right now."""
    try:
        with urllib.request.urlopen(address + route, timeout=HEALTH_TIMEOUT_S) as reply:  # noqa: S310
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class BuilderLoop:
    """Level-triggered: each tick sees the whole world, so a missed nudge costs one interval."""

    engine: Engine
    docker: ContainerRuntime
    applier: Applier
    gpus: GpuSource
    redis: redis.Redis
    interval_s: float
    preparer: Preparer = field(default_factory=lambda: Preparer(()))
    downloads: HubDownloads | None = None  # Hugging Face models asked for ahead of time
    health_routes: dict[str, str] = field(default_factory=dict)
    _first_seen: dict[str, float] = field(default_factory=dict)
    _inventory_at: float = 0.0
    _memory_total: int | None = None  # Docker's MemTotal
    _memory_at: float = 0.0
    _pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8))
    _shipped: set[str] = field(default_factory=set)
    _history: dict[str, History] = field(default_factory=dict)
    _evicted: dict[str, float] = field(default_factory=dict)
    _accrued_at: float = 0.0
    _published: dict[str, str] | None = None
    _docker_said: bool = False  # endpoints say they wait for the Docker Engine

    def __post_init__(self) -> None:
        self._key_secret = key_secret(self.applier.settings.data_dir)
        self._inventory = self.gpus.read()
        self._inventory_at = time.monotonic()
        logger.info(
            "GPU inventory: %d GPUs. %s", len(self._inventory.gpus), self._inventory.message
        )
        self.logs = LogShipper(self.docker, self.redis)
        self.images = ImageKeeper(self.docker, self.redis, self.applier.settings)
        self.starting = StartingLogs(self.docker, self._pool)
        self._publish_inventory()

    def _health(self, replicas: list[Replica], routes: dict[str, str]) -> dict[str, bool]:
        starting = [r for r in replicas if r.state == ReplicaState.STARTING and r.address]
        results = self._pool.map(
            lambda r: probe(str(r.address), routes.get(r.endpoint_id, "/health")), starting
        )
        return {r.id: ok for r, ok in zip(starting, results, strict=True)}

    def observe(self) -> Observed:
        with session_scope(self.engine) as session:
            endpoints = list(queries.all_endpoints(session=session))
            replicas = list(queries.all_replicas(session=session))
        containers = self.docker.list_managed()
        now = time.time()
        self._first_seen = {c.id: self._first_seen.get(c.id, now) for c in containers}
        if time.monotonic() - self._inventory_at > INVENTORY_REFRESH_S:
            self._inventory, self._inventory_at = self.gpus.read(), time.monotonic()
            self._publish_inventory()
        routes = {e.id: server_command(e)[2] for e in endpoints}
        preparing, notes = self.preparer.poll(endpoints)
        self._record(notes)
        self._publish_progress(preparing)
        try:
            inflight = bus.inflight(self.redis)  # the api's requests and the workers'
        except redis.RedisError:
            inflight = {}
        return Observed(
            endpoints=endpoints,
            replicas=replicas,
            containers=containers,
            healthy=self._health(replicas, routes),
            inflight=inflight,
            first_seen=dict(self._first_seen),
            inventory=self._inventory,
            now=now,
            preparing=preparing,
            last_lines=self.starting.read(endpoints, replicas),
            memory_bytes=self._replica_memory(),
            replica_network=self.applier.settings.replica_network,
        )

    def _replica_memory(self) -> int:
        """What the replicas' memory limits may add up to: the setting, else the box's memory
        (Docker's MemTotal, read as often as the GPU inventory) less the reserve."""
        configured = self.applier.settings.replica_memory_bytes
        if configured is not None:
            return configured
        if self._memory_total is None or time.monotonic() - self._memory_at > INVENTORY_REFRESH_S:
            total = self.docker.memory_bytes()
            if total != self._memory_total:
                logger.info(
                    "box memory: %s; replicas' memory limits may add up to %s",
                    memory.gib(total),
                    memory.gib(memory.for_replicas(total)),
                )
            self._memory_total, self._memory_at = total, time.monotonic()
        return memory.for_replicas(self._memory_total)

    def _record(self, notes: list[Note]) -> None:
        if not notes:
            return
        with session_scope(self.engine) as session:
            for note in notes:
                queries.add_event(note.endpoint_id, note.kind, note.message, session=session)

    def _publish_progress(self, preparing: dict[str, Readiness]) -> None:
        """Progress for the api's GET (`appliance:progress`); only when it changed."""
        progress = {
            endpoint_id: json.dumps(readiness.progress.to_json(), sort_keys=True)
            for endpoint_id, readiness in preparing.items()
            if isinstance(readiness, Waiting)
        }
        if progress == self._published:
            return
        try:
            bus.publish_progress(self.redis, progress)
            self._published = progress
        except redis.RedisError:
            logger.warning("cannot publish progress to Redis")

    def tick(self) -> int:
        """One reconcile pass; returns how many actions it applied that call for another pass
        soon."""
        observed = self.observe()
        if self._docker_said:  # it answers: the planner says what each endpoint waits on now
            self._say_docker_wait(None)
        if observed.now - self._accrued_at >= metering.ACCRUE_EVERY_S:
            self._accrue(observed.now)
        self._ship_logs(observed)
        self.images.tick(observed.endpoints)  # lists and prunes on its own thread
        self._download_ahead()
        self._scale(observed)
        actions = plan(observed)
        quiet = [a for a in actions if isinstance(a, SetStatus) and not a.event]
        for action in actions:
            try:
                self.applier.apply(action)
            except Exception:
                logger.exception("action %s failed; retrying on the next tick", action)
            if isinstance(action, SetDesired):  # an eviction: the scaler starts afresh there
                self._history[action.endpoint_id] = ((observed.now, action.desired),)
                self._evicted[action.endpoint_id] = observed.now
        return len(actions) - len(quiet)  # new progress figures alone need no quick next tick

    def _download_ahead(self) -> None:
        """Downloads asked for without an endpoint; a failure here never stops the tick."""
        if self.downloads is None:
            return
        try:
            self.downloads.tick()
        except redis.RedisError as exc:  # a line a tick while Redis is down, not a traceback
            logger.warning("cannot follow the downloads asked for ahead of time: %s", exc)
        except Exception:
            logger.exception("cannot follow the downloads asked for ahead of time")

    def _accrue(self, now: float) -> None:
        """Replica time into the usage table (`builder/metering.py`); a failure waits for the
        next interval and never stops the tick (the time is accounted then)."""
        self._accrued_at = now
        try:
            with session_scope(self.engine) as session:
                metering.settle(session, queries.all_replicas(session=session), now)
        except Exception:
            logger.exception("could not account replica time; trying again later")

    def _scale(self, observed: Observed) -> None:
        """The scaler: changes desired counts only; the planner does the container work."""
        loads = gather(
            self.redis,
            observed.replicas,
            observed.inflight,
            self._pool,
            self._key_secret,
        )
        self._history = {
            e.id: self._history[e.id] for e in observed.endpoints if e.id in self._history
        }
        for endpoint in observed.endpoints:
            load = replace(
                loads.get(endpoint.id, Load()), evicted_at=self._evicted.get(endpoint.id)
            )
            seen = load.last_request_at
            if seen and seen - (endpoint.last_request_at or 0.0) >= LAST_REQUEST_WRITE_S:
                self.applier.apply(NoteLastRequest(endpoint.id, seen))
            endpoint.last_request_at = seen or endpoint.last_request_at
            if endpoint.status in (EndpointStatus.DELETE_IN_PROGRESS, EndpointStatus.UPDATE_FAILED):
                continue
            history = self._history.get(endpoint.id) or ((observed.now, endpoint.desired_replicas),)
            decision = decide(endpoint, load, history, observed.now)
            self._history[endpoint.id] = decision.history
            if decision.reason is not None:
                self.applier.apply(SetDesired(endpoint.id, decision.desired, decision.reason))
                endpoint.desired_replicas = decision.desired

    def _ship_logs(self, observed: Observed) -> None:
        containers = {c.id for c in observed.containers if c.running}
        running = {
            r.id: r.container_id
            for r in observed.replicas
            if r.container_id in containers and r.container_id is not None
        }
        known = {r.id for r in observed.replicas}
        self.logs.forget([r for r in self._shipped if r not in known])
        self._shipped = set(known)
        self.logs.sync(running)

    def _publish_inventory(self) -> None:
        try:
            self.redis.set(bus.GPUS_KEY, json.dumps(self._inventory.to_json()))
        except redis.RedisError:
            logger.warning("cannot publish the GPU inventory to Redis")

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            busy = 0
            try:
                busy = self.tick()
                bus.beat(self.redis, "builder")
            except DockerUnavailableError as exc:
                logger.warning("Docker Engine unavailable: %s", exc)
                self._say_docker_wait(docker_wait(str(exc).splitlines()[0][:200]))
            except redis.RedisError as exc:  # the tick ran; its heartbeat did not get through
                logger.warning("Redis unavailable: %s", exc)
            except Exception:
                logger.exception("reconcile tick failed")
            self._wait(0.2 if busy else self.interval_s)

    def _say_docker_wait(self, reason: str | None) -> None:
        """The endpoints waiting on this builder say that it waits for the Docker Engine (or,
        with None, no longer); a failure here is retried on the next tick."""
        try:
            self.applier.apply(SayDockerWait(reason))
            self._docker_said = reason is not None
        except Exception:
            logger.exception("cannot say on the endpoints that the Docker Engine is unavailable")

    def _wait(self, seconds: float) -> None:
        try:
            self.redis.blpop([bus.BUILDER_NUDGE_KEY], timeout=max(seconds, 0.1))
        except redis.RedisError:
            time.sleep(seconds)
