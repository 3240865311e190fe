"""The reconciler's pure planner: desired endpoints and observed replicas in, actions out.

`plan` is called by the builder loop once a tick with everything it observed; it does no I/O and
takes `now` as an argument, so every decision is unit-tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from appliance.errors import NoFreeGpuError
from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState
from builder import memory
from builder.actions import (
    Action,
    AdoptContainer,
    DeleteEndpoint,
    DrainReplica,
    FailReplica,
    MarkReady,
    Observed,
    RemoveOrphan,
    RemoveReplica,
    SetDesired,
    SetStatus,
    StartReplica,
)
from builder.docker_engine import ContainerInfo
from builder.prepare import Failed, Readiness, Waiting
from builder.specs import (
    LABEL_GPU_FRACTION,
    LABEL_GPUS,
    LABEL_NETWORK,
    LABEL_REPLICA,
    has_stale_key,
)
from builder.starting import DEPLOYING, describe, is_starting
from gpu.place import GpuRequest, place

CREATE_GRACE_S = 60.0  # a row with no container yet: the builder died between row and create
ORPHAN_GRACE_S = 30.0  # a labelled container with no row: give a crashed builder time to adopt
MIN_DRAIN_S = 3.0  # time for every api process to drop a stopping replica from its routes
DRAIN_TIMEOUT_S = 60.0  # in-flight requests get this long to finish before the container stops
CRASH_WINDOW_S = 600.0
CRASH_LIMIT = 3
CRASH_BACKOFF_BASE_S = 2.0
CRASH_BACKOFF_MAX_S = 60.0
LIVE = (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.UNHEALTHY)
MEMORY_WAIT = "waiting for memory: needs "
NO_REPLICAS_ALLOWED = "scaled to 0: no replicas allowed, as its max_workers is 0; raise it to serve"
ROOM_WAITS = ("waiting for GPUs", "waiting for memory")  # the reasons `_make_room` words


def waits_for_room(reason: str | None) -> bool:
    """True when an endpoint's next replica waits for GPUs or memory (`_make_room`): nothing
    of its deploy is under way, and it may wait forever, so an edit may replace it."""
    return reason is not None and reason.startswith(ROOM_WAITS)


@dataclass
class _Tick:
    """Working state of one plan: claims grow as replicas are planned."""

    obs: Observed
    claims: dict[int, float] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    evicted: set[str] = field(default_factory=set)
    held: dict[str, int] = field(default_factory=dict)  # replica (or orphan container) -> bytes
    memory_claimed: int = 0  # bytes held by replicas, orphans and this tick's starts

    def claim(self, gpus: Sequence[int], fraction: float) -> None:
        for gpu in gpus:
            self.claims[gpu] = self.claims.get(gpu, 0.0) + fraction

    def hold(self, limit_bytes: int, key: str | None = None) -> None:
        """Counts a memory limit against the box's budget (nothing when there is none); `key`
        names the replica or container holding it, for eviction."""
        if self.obs.memory_bytes is None:
            return
        counted = memory.counted(limit_bytes, self.obs.memory_bytes)
        self.memory_claimed += counted
        if key is not None:
            self.held[key] = counted

    def memory_fits(self, endpoint: Endpoint, freed: int = 0) -> bool:
        """Whether one more replica of `endpoint` fits beside what is held, less `freed`; a
        GPU replica always does (its GPUs bound it)."""
        budget = self.obs.memory_bytes
        if budget is None or endpoint.gpus:
            return True
        need = memory.counted(endpoint.memory_bytes, budget)
        return self.memory_claimed - freed + need <= budget


def plan(obs: Observed) -> list[Action]:
    """The actions that move what runs toward what the endpoint rows ask for."""
    tick = _Tick(obs)
    containers = {c.labels.get(LABEL_REPLICA, ""): c for c in obs.containers}
    known = {r.id for r in obs.replicas}
    endpoints = {e.id: e for e in obs.endpoints}
    for replica in obs.replicas:
        if replica.state != ReplicaState.FAILED:
            tick.claim(replica.gpus, replica.gpu_fraction)
            if not replica.gpus:
                tick.hold(_memory_limit(replica, containers, endpoints), replica.id)
    for container in obs.containers:
        if container.labels.get(LABEL_REPLICA) not in known:
            _plan_orphan(tick, container)
    for replica in obs.replicas:
        if replica.endpoint_id not in endpoints:
            tick.actions.append(RemoveReplica(replica.id))
    for endpoint in sorted(obs.endpoints, key=lambda e: (-e.priority, e.created_at)):
        replicas = [r for r in obs.replicas if r.endpoint_id == endpoint.id]
        _plan_endpoint(tick, endpoint, replicas, containers)
    return tick.actions


def _memory_limit(
    replica: Replica, containers: Mapping[str, ContainerInfo], endpoints: Mapping[str, Endpoint]
) -> int:
    """The limit a replica's container runs with, else (no container seen yet) its endpoint's:
    during a roll that changed `memory`, old replicas still hold the old limit."""
    container = containers.get(replica.id)
    if container is not None and container.memory_bytes:
        return container.memory_bytes
    endpoint = endpoints.get(replica.endpoint_id)
    return endpoint.memory_bytes if endpoint is not None else 0


def _plan_orphan(tick: _Tick, container: ContainerInfo) -> None:
    gpus = [int(g) for g in container.labels.get(LABEL_GPUS, "").split(",") if g]
    tick.claim(gpus, float(container.labels.get(LABEL_GPU_FRACTION, "1.0")))
    if not gpus:
        tick.hold(container.memory_bytes or 0)
    seen = tick.obs.first_seen.get(container.id, tick.obs.now)
    if tick.obs.now - seen >= ORPHAN_GRACE_S:
        tick.actions.append(RemoveOrphan(container.id))


def _observe_replica(
    tick: _Tick, endpoint: Endpoint, replica: Replica, container: ContainerInfo | None
) -> bool:
    """Plans what the container's state demands; True when the replica is still live."""
    now = tick.obs.now
    if replica.container_id is None:
        if container is not None:
            tick.actions.append(AdoptContainer(replica.id, container.id, container.address))
        elif now - replica.created_at > CREATE_GRACE_S:
            tick.actions.append(FailReplica(replica.id, "container was never created", False))
            return False
        return True
    if container is not None and container.status == "created":  # a builder died mid-create
        why = "its container was created but never started; replacing it"
        tick.actions.append(FailReplica(replica.id, why, crashed=False))
        return False
    if container is None or not container.running:
        if replica.state == ReplicaState.STOPPING:
            tick.actions.append(RemoveReplica(replica.id))
        else:
            why = "container disappeared" if container is None else exited(container)
            tick.actions.append(FailReplica(replica.id, why))
        return False
    if container.address and container.address != replica.address:
        # restarted (`docker restart`, its restart policy, the Docker Engine's own restart)
        # on another published port: reach it where it is now
        tick.actions.append(AdoptContainer(replica.id, container.id, container.address))
    if replica.state == ReplicaState.STOPPING:
        waited = now - replica.state_since
        idle = tick.obs.inflight.get(replica.id, 0) <= 0
        if waited >= MIN_DRAIN_S and (idle or waited >= DRAIN_TIMEOUT_S):
            tick.actions.append(RemoveReplica(replica.id))
        return False
    if replica.state == ReplicaState.STARTING:
        if tick.obs.healthy.get(replica.id):
            tick.actions.append(MarkReady(replica.id))
        elif now - replica.created_at > endpoint.startup_timeout_s:
            tick.actions.append(
                FailReplica(replica.id, f"not healthy after {endpoint.startup_timeout_s} s")
            )
            return False
    return True


def exited(container: ContainerInfo) -> str:
    """Why a replica's container stopped, as its failure says it: its exit code, or, when the
    kernel's OOM killer ended it (code 137), that it ran out of its memory limit; or that
    someone paused it (`docker pause`), which leaves no exit code to tell."""
    if container.status == "paused":
        return "container was paused (docker pause), so its server answers nothing; replacing it"
    if not container.oom_killed:
        return f"container exited with code {container.exit_code}"
    limit = f", {memory.gib(container.memory_bytes)}" if container.memory_bytes else ""
    return f"container ran out of memory (its limit{limit}): raise the endpoint's `memory`"


def _replace_stale(
    tick: _Tick, endpoint: Endpoint, replica: Replica, container: ContainerInfo | None
) -> bool:
    """Drains a replica an older version started with the install-wide key (the api sends
    each replica its own now, so it would only answer 401s), or on another network than
    replicas join now (in compose, the appliance's own, where Redis is); True when it did.
    Requests wait for its successor as for a cold start."""
    if container is None:
        return False
    if has_stale_key(endpoint.framework, container.labels):
        why = "started by an older version with the install-wide replica key; replacing it"
    elif (container.labels.get(LABEL_NETWORK) or None) != tick.obs.replica_network:
        joined = container.labels.get(LABEL_NETWORK) or "none"
        why = (
            f"on network {joined}, not {tick.obs.replica_network or 'none'} where replicas "
            "run now; replacing it"
        )
    else:
        return False
    tick.actions.append(DrainReplica(replica.id, why))
    return True


def _plan_endpoint(
    tick: _Tick,
    endpoint: Endpoint,
    replicas: list[Replica],
    containers: Mapping[str, ContainerInfo],
) -> None:
    live = [
        r
        for r in replicas
        if r.state in (*LIVE, ReplicaState.STOPPING)
        and _observe_replica(tick, endpoint, r, containers.get(r.id))
        and not _replace_stale(tick, endpoint, r, containers.get(r.id))
    ]
    if endpoint.status == EndpointStatus.DELETE_IN_PROGRESS:
        tick.actions.extend(DrainReplica(r.id, "endpoint deleted") for r in live)
        if not any(r.state in (*LIVE, ReplicaState.STOPPING) for r in replicas):
            tick.actions.append(DeleteEndpoint(endpoint.id))
        return
    if endpoint.status == EndpointStatus.UPDATE_FAILED:
        return
    readiness = tick.obs.preparing.get(endpoint.id)
    if isinstance(readiness, Failed):
        tick.actions.append(
            SetStatus(
                endpoint.id, endpoint.generation, EndpointStatus.UPDATE_FAILED, readiness.message
            )
        )
        return
    ids = {r.id for r in replicas}
    if any(isinstance(a, FailReplica) and a.crashed and a.replica_id in ids for a in tick.actions):
        # a crash seen this tick counts from the next one, once its row says so (with its log
        # tail): starting a replacement now would skip its backoff and the crash limit
        return
    crashes = [
        r
        for r in replicas
        if r.state == ReplicaState.FAILED
        and r.generation == endpoint.generation
        and tick.obs.now - r.state_since < CRASH_WINDOW_S
        and r.last_error
    ]
    if len(crashes) >= CRASH_LIMIT:
        last = max(crashes, key=lambda r: r.state_since)
        reason = f"replica crashed {len(crashes)} times; last: {last.last_error}"
        if last.log_tail:
            reason += f"\n{last.log_tail.strip()}"
        tick.actions.append(
            SetStatus(endpoint.id, endpoint.generation, EndpointStatus.UPDATE_FAILED, reason)
        )
        return
    _plan_scale_and_roll(tick, endpoint, live, crashes)


def _backoff_over(tick: _Tick, crashes: Sequence[Replica]) -> bool:
    if not crashes:
        return True
    last = max(r.state_since for r in crashes)
    wait = min(CRASH_BACKOFF_BASE_S * 2 ** (len(crashes) - 1), CRASH_BACKOFF_MAX_S)
    return bool(tick.obs.now >= last + wait)


def _plan_scale_and_roll(
    tick: _Tick, endpoint: Endpoint, live: list[Replica], crashes: Sequence[Replica]
) -> None:
    desired = max(endpoint.min_replicas, min(endpoint.desired_replicas, endpoint.max_replicas))
    current = [r for r in live if r.generation == endpoint.generation]
    old = [r for r in live if r.generation != endpoint.generation]
    ready = [r for r in current if r.state == ReplicaState.READY]
    reason: str | None = None
    waiting = tick.obs.preparing.get(endpoint.id)
    if len(current) < desired and isinstance(waiting, Waiting):
        reason = waiting.progress.describe()  # no replica until what it needs is here
    elif len(current) < desired and _backoff_over(tick, crashes):
        reason = _plan_start(tick, endpoint, current, old)
    elif len(current) > desired:
        extra = sorted(current, key=lambda r: (r.state == ReplicaState.READY, r.created_at))
        for replica in extra[: len(current) - desired]:
            tick.actions.append(DrainReplica(replica.id, "scaled down"))
    removable = len(old) if desired == 0 else len(old) + len(ready) - desired
    for replica in old[: max(removable, 0)]:
        tick.actions.append(DrainReplica(replica.id, "replaced by a new generation"))
    starting = [r for r in current if r.state == ReplicaState.STARTING]
    if reason is None and starting and not ready and endpoint.status in DEPLOYING:
        reason = describe(starting, tick.obs.last_lines, tick.obs.now)
    _plan_status(tick, endpoint, reason, waiting, converged=len(ready) == desired and not old)


def _plan_status(
    tick: _Tick, endpoint: Endpoint, reason: str | None, waiting: Readiness | None, converged: bool
) -> None:
    """The status and its reason, written only when one of them changed; a converged endpoint
    goes READY without first writing the reason it had while it started (with no reason, or
    `NO_REPLICAS_ALLOWED` when its max replicas is 0)."""
    event = not _same_wait(endpoint.status_reason, reason, waiting)
    if endpoint.status == EndpointStatus.UPDATE_PENDING or (
        endpoint.status == EndpointStatus.UPDATE_IN_PROGRESS
        and reason != endpoint.status_reason
        and not converged
    ):
        status = EndpointStatus.UPDATE_IN_PROGRESS
        event = event or endpoint.status != status
        tick.actions.append(SetStatus(endpoint.id, endpoint.generation, status, reason, event))
    # READY says it is deployed; with max 0 nothing runs, and its reason says so
    settled = NO_REPLICAS_ALLOWED if endpoint.max_replicas == 0 else None
    if converged and (endpoint.status != EndpointStatus.READY or endpoint.status_reason != settled):
        tick.actions.append(
            SetStatus(endpoint.id, endpoint.generation, EndpointStatus.READY, settled)
        )
    elif endpoint.status == EndpointStatus.READY and reason and reason != endpoint.status_reason:
        tick.actions.append(
            SetStatus(endpoint.id, endpoint.generation, EndpointStatus.READY, reason, event)
        )


def _same_wait(before: str | None, after: str | None, waiting: Readiness | None) -> bool:
    """True when only the progress figures of one wait changed, only how far the starting
    replicas are (its seconds, its last line), or only the free memory a replica waits for
    (other replicas came or went; their own events say so): no event for that."""
    if is_starting(after) and (before is None or is_starting(before)):
        return True
    if before and after and before.startswith(MEMORY_WAIT) and after.startswith(MEMORY_WAIT):
        return True
    if is_starting(before) and after is None:  # they are gone: their own events say why
        return True
    if not isinstance(waiting, Waiting) or before is None or after is None:
        return False
    return before.startswith(waiting.progress.headline + ":")


def _plan_start(
    tick: _Tick, endpoint: Endpoint, current: list[Replica], old: list[Replica]
) -> str | None:
    """Places one new replica on GPUs and in the box's memory; returns why it has to wait, if
    it does."""
    fraction = (endpoint.gpu_memory_fraction or 1.0) if endpoint.gpus else 1.0
    try:
        gpus = place(tick.obs.inventory, tick.claims, GpuRequest(endpoint.gpus, fraction))
    except NoFreeGpuError as exc:
        return _make_room(tick, endpoint, current, old, fraction, "GPUs", exc.message)
    if not tick.memory_fits(endpoint):
        budget = tick.obs.memory_bytes or 0
        why = memory.shortage(endpoint.memory_bytes, budget, tick.memory_claimed)
        return _make_room(tick, endpoint, current, old, fraction, "memory", why)
    tick.claim(gpus, fraction)
    if not gpus:
        tick.hold(endpoint.memory_bytes)
    tick.actions.append(StartReplica(endpoint.id, gpus, fraction if gpus else 0.0))
    return None


def _make_room(
    tick: _Tick,
    endpoint: Endpoint,
    current: list[Replica],
    old: list[Replica],
    fraction: float,
    what: str,
    shortage: str,
) -> str:
    """What an endpoint does when its next replica does not fit (GPUs or memory): in a roll,
    replace one old replica; otherwise evict an idle one of a lower-priority endpoint."""
    starting = any(r.state == ReplicaState.STARTING for r in current)
    if old and not starting:  # no room to surge: make room by replacing one old replica
        tick.actions.append(DrainReplica(old[0].id, "making room for the new generation"))
    elif not old and (victim := _evict_for(tick, endpoint, fraction)):
        return f"waiting for {what}: evicting an idle replica of {victim}"
    return f"waiting for {what}: {shortage}"


def _evict_for(tick: _Tick, endpoint: Endpoint, fraction: float) -> str | None:
    """Frees GPUs and memory for `endpoint` by draining one idle replica of a lower-priority
    endpoint that is above its minimum, least recently used first, whose going makes room for
    both; returns that endpoint's name."""
    endpoints = {e.id: e for e in tick.obs.endpoints}
    live = [r for r in tick.obs.replicas if r.state in LIVE]
    count = {e: sum(r.endpoint_id == e for r in live) for e in endpoints}
    candidates = sorted(
        (
            r
            for r in live
            if r.state == ReplicaState.READY
            and r.id not in tick.evicted
            and (owner := endpoints.get(r.endpoint_id)) is not None
            and owner.priority < endpoint.priority
            and count[owner.id] > owner.min_replicas
            and tick.obs.inflight.get(r.id, 0) <= 0
        ),
        key=lambda r: (endpoints[r.endpoint_id].last_request_at or 0.0, r.created_at),
    )
    for victim in candidates:
        claims = dict(tick.claims)
        for gpu in victim.gpus:
            claims[gpu] = claims.get(gpu, 0.0) - victim.gpu_fraction
        try:
            place(tick.obs.inventory, claims, GpuRequest(endpoint.gpus, fraction))
        except NoFreeGpuError:
            continue
        if not tick.memory_fits(endpoint, freed=tick.held.get(victim.id, 0)):
            continue
        owner = endpoints[victim.endpoint_id]
        tick.evicted.add(victim.id)
        why = f"evicted for {_named_to(owner, endpoint)} (priority {endpoint.priority})"
        tick.actions.append(DrainReplica(victim.id, why))
        tick.actions.append(SetDesired(owner.id, max(count[owner.id] - 1, owner.min_replicas), why))
        return _named_to(endpoint, owner)
    return None


def _named_to(reader: Endpoint, other: Endpoint) -> str:
    """`other` as words that `reader`'s team reads (its reason, its events): its name when it
    is the same team's; another team's endpoint is not named, as no listing names it."""
    return other.name if other.owner == reader.owner else "another team's endpoint"
