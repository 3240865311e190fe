"""The planner as a pure function: rows and containers in, actions out, time as a parameter."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from appliance.models import Endpoint, EndpointStatus, Replica, ReplicaState
from builder import actions as act
from builder import memory
from builder import reconcile as rc
from builder.docker_engine import ContainerInfo
from builder.prepare import Failed, Progress, Waiting
from builder.specs import LABEL_REPLICA_KEY, REPLICA_KEY_SCHEME
from gpu.inventory import EMPTY, Inventory, StaticGpuSource
from tests.factories import make_endpoint

NOW = 10_000.0
EIGHT = StaticGpuSource(Path(__file__).parents[1] / "gpu" / "eight_h100.json").read()


def endpoint(**kw: object) -> Endpoint:
    return make_endpoint(**kw)


def replica(rid: str, **kw: object) -> Replica:
    fields: dict[str, object] = dict(
        id=rid,
        endpoint_id="end_a",
        generation=1,
        container_id=f"c-{rid}",
        container_name=rid,
        address="http://x",
        gpus=[0],
        state=ReplicaState.READY,
        created_at=NOW - 100,
        state_since=NOW - 100,
    )
    fields.update(kw)
    return Replica(**fields)


def container(rid: str, status: str = "running", **labels: str) -> ContainerInfo:
    """A container as this version's builder starts it (its replica key its own)."""
    labels = {"appliance.replica": rid, LABEL_REPLICA_KEY: REPLICA_KEY_SCHEME, **labels}
    return ContainerInfo(f"c-{rid}", rid, labels, status, 137, "http://x")


def older(rid: str) -> ContainerInfo:
    """A container an older version started: no key label, the install-wide key in its env."""
    return ContainerInfo(f"c-{rid}", rid, {"appliance.replica": rid}, "running", None, "http://x")


def plan(
    endpoints: Sequence[Endpoint],
    replicas: Sequence[Replica] = (),
    containers: Sequence[ContainerInfo] | None = None,
    *,
    inventory: Inventory = EIGHT,
    healthy: dict[str, bool] | None = None,
    now: float = NOW,
    **kw: object,
) -> list[act.Action]:
    if containers is None:
        containers = [container(r.id) for r in replicas if r.container_id]
    obs = act.Observed(
        endpoints,
        replicas,
        containers,
        healthy or {},
        kw.get("inflight", {}),
        kw.get("first_seen", {}),  # type: ignore[arg-type]
        inventory,
        now,
        kw.get("preparing", {}),  # type: ignore[arg-type]
        kw.get("last_lines", {}),  # type: ignore[arg-type]
        memory_bytes=kw.get("memory_bytes"),  # type: ignore[arg-type]
        replica_network=kw.get("replica_network"),  # type: ignore[arg-type]
    )
    return rc.plan(obs)


def test_a_new_endpoint_gets_a_replica_on_a_free_gpu() -> None:
    actions = plan([endpoint(status=EndpointStatus.UPDATE_PENDING)])
    assert act.StartReplica("end_a", (0,), 1.0) in actions
    assert act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, None) in actions


def test_an_endpoint_allowed_no_replica_is_ready_saying_none_will_run() -> None:
    none = dict(min_replicas=0, max_replicas=0, desired_replicas=0)
    actions = plan([endpoint(status=EndpointStatus.UPDATE_PENDING, **none)])
    assert not any(isinstance(a, act.StartReplica) for a in actions)
    assert actions[-1] == act.SetStatus("end_a", 1, EndpointStatus.READY, rc.NO_REPLICAS_ALLOWED)
    assert "max_workers is 0" in rc.NO_REPLICAS_ALLOWED
    said = endpoint(status=EndpointStatus.READY, status_reason=rc.NO_REPLICAS_ALLOWED, **none)
    assert plan([said]) == []  # written once
    raised = dict(min_replicas=0, max_replicas=2, desired_replicas=0)  # idle: scaled to zero
    assert plan([endpoint(status_reason=rc.NO_REPLICAS_ALLOWED, **raised)]) == [
        act.SetStatus("end_a", 1, EndpointStatus.READY, None)
    ]


def test_gpus_claimed_by_replicas_are_not_given_twice() -> None:
    other = endpoint(id="end_b", name="b", status=EndpointStatus.UPDATE_PENDING)
    actions = plan([endpoint(), other], [replica("r1", gpus=[0])])
    assert act.StartReplica("end_b", (1,), 1.0) in actions


def test_a_healthy_starting_replica_becomes_ready_and_the_endpoint_ready() -> None:
    starting = replica("r1", state=ReplicaState.STARTING)
    assert act.MarkReady("r1") in plan([endpoint()], [starting], healthy={"r1": True})
    ready = plan([endpoint()], [replica("r1")])
    assert ready == [act.SetStatus("end_a", 1, EndpointStatus.READY, None)]


def test_a_replica_that_never_gets_healthy_fails_after_the_startup_timeout() -> None:
    slow = replica("r1", state=ReplicaState.STARTING, created_at=NOW - 2000)
    actions = plan([endpoint(startup_timeout_s=1800)], [slow])
    assert act.FailReplica("r1", "not healthy after 1800 s") in actions


def test_an_exited_container_fails_its_replica() -> None:
    actions = plan([endpoint()], [replica("r1")], [container("r1", "exited")])
    assert act.FailReplica("r1", "container exited with code 137") in actions


def test_a_paused_container_is_replaced_saying_it_was_paused() -> None:
    """`docker pause` on a replica hangs its server; the builder replaces it, and said it had
    "exited with code 0", which it had not."""
    actions = plan([endpoint()], [replica("r1")], [container("r1", "paused")])
    why = "container was paused (docker pause), so its server answers nothing; replacing it"
    assert act.FailReplica("r1", why) in actions


def test_a_container_killed_for_memory_says_so_and_what_to_change() -> None:
    """Docker's OOM killer ends a replica over its memory limit with code 137, which told a
    user nothing (a vLLM endpoint given 1Gi crash-looped so): the reason says it ran out of
    its memory limit and to raise `memory`."""
    labels = {"appliance.replica": "r1", LABEL_REPLICA_KEY: REPLICA_KEY_SCHEME}
    killed = ContainerInfo("c-r1", "r1", labels, "exited", 137, "http://x", GIB, oom_killed=True)
    actions = plan([endpoint()], [replica("r1")], [killed])
    why = "container ran out of memory (its limit, 1.0 GiB): raise the endpoint's `memory`"
    assert act.FailReplica("r1", why) in actions


def test_a_container_never_started_is_replaced_without_counting_as_a_crash() -> None:
    actions = plan([endpoint()], [replica("r1")], [container("r1", "created")])
    why = "its container was created but never started; replacing it"
    assert act.FailReplica("r1", why, crashed=False) in actions


def crashed(rid: str, at: float) -> Replica:
    return replica(
        rid,
        state=ReplicaState.FAILED,
        state_since=at,
        gpus=[],
        last_error="container exited with code 1",
        log_tail="no such file",
    )


def test_restarts_back_off_then_stop_with_the_last_error() -> None:
    one = [crashed("f1", NOW - 1)]
    assert not any(isinstance(a, act.StartReplica) for a in plan([endpoint()], one))
    assert any(isinstance(a, act.StartReplica) for a in plan([endpoint()], one, now=NOW + 2))
    three = [crashed(f"f{i}", NOW - i) for i in range(3)]
    [failed] = plan([endpoint()], three)
    assert isinstance(failed, act.SetStatus) and failed.status == EndpointStatus.UPDATE_FAILED
    assert failed.reason is not None and "no such file" in failed.reason


def test_a_crash_seen_this_tick_starts_nothing_until_it_counts() -> None:
    """The tick that sees a container exit fails its replica and starts no other: the next
    tick counts that crash (its backoff, the crash limit, its log tail). A replacement started
    in the same tick skipped the crash's backoff, and the limit was reached one replica late,
    quoting the crash before ('crashed 3 times' with 4 failed replicas listed)."""
    two = [crashed("f1", NOW - 30), crashed("f2", NOW - 20)]
    exiting = replica("r3", gpus=[])
    actions = plan([endpoint()], [*two, exiting], [container("r3", "exited")])
    assert act.FailReplica("r3", "container exited with code 137") in actions
    assert not any(isinstance(a, act.StartReplica) for a in actions), actions
    three = [*two, crashed("r3", NOW)]
    [failed] = plan([endpoint()], three, now=NOW + 1)
    assert isinstance(failed, act.SetStatus) and failed.status == EndpointStatus.UPDATE_FAILED
    assert failed.reason is not None and failed.reason.startswith("replica crashed 3 times")


def test_a_rolling_update_surges_then_drains_old_once_new_is_ready() -> None:
    new_gen = endpoint(generation=2, status=EndpointStatus.UPDATE_PENDING)
    old = replica("old", generation=1, gpus=[0])
    actions = plan([new_gen], [old])
    assert act.StartReplica("end_a", (1,), 1.0) in actions
    assert not any(isinstance(a, act.DrainReplica) for a in actions)
    new = replica("new", generation=2, gpus=[1])
    actions = plan([new_gen], [old, new])
    assert act.DrainReplica("old", "replaced by a new generation") in actions


def test_without_room_to_surge_one_old_replica_makes_room() -> None:
    one_gpu = Inventory(EIGHT.gpus[:1])
    actions = plan(
        [endpoint(generation=2)], [replica("old", generation=1, gpus=[0])], inventory=one_gpu
    )
    assert act.DrainReplica("old", "making room for the new generation") in actions


def test_a_draining_replica_is_removed_once_idle_or_after_the_timeout() -> None:
    draining = replica("r1", state=ReplicaState.STOPPING, state_since=NOW - 5)
    assert act.RemoveReplica("r1") not in plan([endpoint()], [draining], inflight={"r1": 2})
    assert act.RemoveReplica("r1") in plan([endpoint()], [draining], inflight={})
    old = replica("r1", state=ReplicaState.STOPPING, state_since=NOW - 61)
    assert act.RemoveReplica("r1") in plan([endpoint()], [old], inflight={"r1": 2})


def test_no_gpu_means_waiting_with_a_reason() -> None:
    actions = plan([endpoint(status=EndpointStatus.UPDATE_PENDING)], inventory=EMPTY)
    [status] = actions
    assert isinstance(status, act.SetStatus) and status.reason
    assert status.reason.startswith("waiting for GPUs")


def test_cpu_endpoints_need_no_gpu() -> None:
    actions = plan([endpoint(gpus=0, status=EndpointStatus.UPDATE_PENDING)], inventory=EMPTY)
    assert act.StartReplica("end_a", (), 0.0) in actions


def test_unknown_labelled_containers_are_removed_only_after_a_grace_period() -> None:
    stray = container("ghost", **{"appliance.gpus": "3"})
    early = plan([endpoint(gpus=1, desired_replicas=1)], [], [stray], first_seen={"c-ghost": NOW})
    assert act.RemoveOrphan("c-ghost") not in early
    assert all(getattr(a, "gpu_ids", ()) != (3,) for a in early)  # its GPU stays claimed
    late = plan([], [], [stray], first_seen={"c-ghost": NOW - 31})
    assert late == [act.RemoveOrphan("c-ghost")]


def test_a_container_created_before_a_crash_is_adopted() -> None:
    row = replica("r1", container_id=None, address=None, state=ReplicaState.STARTING)
    actions = plan([endpoint()], [row], [container("r1")])
    assert act.AdoptContainer("r1", "c-r1", "http://x") in actions


def test_a_replica_restarted_on_another_port_is_reached_there() -> None:
    """`docker restart` of a replica (or its restart policy, or the Docker Engine's restart)
    publishes it on a new host port: its row kept the old address, so it answered nothing
    and its endpoint, READY, answered 503 "no ready replica yet" until someone deleted it.
    The builder records the address the container has now."""
    moved = dataclasses.replace(container("r1"), address="http://127.0.0.1:32887")
    for state in (ReplicaState.READY, ReplicaState.STARTING):
        row = replica("r1", address="http://127.0.0.1:32880", state=state)
        actions = plan([endpoint()], [row], [moved])
        assert act.AdoptContainer("r1", "c-r1", "http://127.0.0.1:32887") in actions
    assert not [a for a in plan([endpoint()], [replica("r1")]) if isinstance(a, act.AdoptContainer)]


def test_delete_drains_then_removes_the_row() -> None:
    gone = endpoint(status=EndpointStatus.DELETE_IN_PROGRESS)
    assert plan([gone], [replica("r1")]) == [act.DrainReplica("r1", "endpoint deleted")]
    assert plan([gone], []) == [act.DeleteEndpoint("end_a")]


def test_gpu_pressure_evicts_an_idle_lower_priority_replica_above_its_min() -> None:
    two = Inventory(EIGHT.gpus[:2])
    low = endpoint(
        id="end_low",
        name="low",
        priority=0,
        min_replicas=1,
        desired_replicas=2,
        status=EndpointStatus.READY,
        last_request_at=NOW - 500,
    )
    high = endpoint(
        id="end_high",
        name="high",
        priority=10,
        min_replicas=1,
        status=EndpointStatus.UPDATE_PENDING,
    )
    replicas = [
        replica("l1", endpoint_id="end_low", gpus=[0], created_at=1.0),
        replica("l2", endpoint_id="end_low", gpus=[1], created_at=2.0),
    ]
    actions = plan([low, high], replicas, inventory=two, inflight={"l1": 1})
    assert act.DrainReplica("l2", "evicted for high (priority 10)") in actions
    assert act.SetDesired("end_low", 1, "evicted for high (priority 10)") in actions
    assert not any(isinstance(a, act.StartReplica) for a in actions)


def test_eviction_never_goes_below_min_nor_takes_from_higher_priority() -> None:
    one = Inventory(EIGHT.gpus[:1])
    at_min = endpoint(
        id="end_low", name="low", priority=0, min_replicas=1, status=EndpointStatus.READY
    )
    high = endpoint(id="end_high", name="high", priority=10, status=EndpointStatus.UPDATE_PENDING)
    held = [replica("l1", endpoint_id="end_low", gpus=[0])]
    actions = plan([at_min, high], held, inventory=one)
    assert not any(isinstance(a, act.DrainReplica | act.SetDesired) for a in actions)
    waiting = [a for a in actions if isinstance(a, act.SetStatus) and a.endpoint_id == "end_high"]
    assert waiting and waiting[0].reason and waiting[0].reason.startswith("waiting for GPUs")
    lower = endpoint(id="end_high", name="high", priority=-1, status=EndpointStatus.UPDATE_PENDING)
    above_min = endpoint(
        id="end_low", name="low", priority=0, min_replicas=0, status=EndpointStatus.READY
    )
    actions = plan([above_min, lower], held, inventory=one)
    assert not any(isinstance(a, act.DrainReplica) for a in actions)


PULLING = Progress("image", "r.local/x:1", 1_200_000_000, 9_800_000_000, 3, 7)


def test_no_replica_starts_while_its_image_is_pulled_and_the_reason_says_how_far() -> None:
    actions = plan(
        [endpoint(status=EndpointStatus.UPDATE_PENDING)], preparing={"end_a": Waiting(PULLING)}
    )
    assert not [a for a in actions if isinstance(a, act.StartReplica)]
    reason = "pulling image r.local/x:1: 1.2 of 9.8 GB, 3 of 7 layers"
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, reason)]


def test_new_pull_figures_update_the_reason_without_an_event() -> None:
    before = "pulling image r.local/x:1: 0.9 of 9.8 GB, 2 of 7 layers"
    actions = plan([endpoint(status_reason=before)], preparing={"end_a": Waiting(PULLING)})
    reason = PULLING.describe()
    assert actions == [
        act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, reason, event=False)
    ]
    waiting_gpus = plan(
        [endpoint(status_reason="waiting for GPUs: none free")],
        preparing={"end_a": Waiting(PULLING)},
    )
    assert waiting_gpus == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, reason)]


def test_a_ready_endpoint_scaling_up_keeps_serving_while_it_waits_for_the_image() -> None:
    ready = endpoint(status=EndpointStatus.READY, desired_replicas=2)
    actions = plan([ready], [replica("r1")], preparing={"end_a": Waiting(PULLING)})
    assert not [a for a in actions if isinstance(a, (act.StartReplica, act.DrainReplica))]
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.READY, PULLING.describe())]


def test_a_failed_pull_fails_the_endpoint_with_its_words_and_starts_nothing() -> None:
    words = "cannot pull image r.local/x:1: manifest unknown"
    actions = plan([endpoint()], preparing={"end_a": Failed(words)})
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_FAILED, words)]


def test_an_endpoint_with_nothing_to_wait_for_starts_as_before() -> None:
    other = endpoint(id="end_b", name="b")
    actions = plan([endpoint(), other], preparing={"end_b": Waiting(PULLING)})
    assert act.StartReplica("end_a", (0,), 1.0) in actions
    assert not [a for a in actions if isinstance(a, act.StartReplica) and a.endpoint_id == "end_b"]


STALE = "started by an older version with the install-wide replica key; replacing it"


def test_a_replica_an_older_version_started_is_drained_and_replaced() -> None:
    actions = plan([endpoint()], [replica("r1", gpus=[0])], [older("r1")])
    assert act.DrainReplica("r1", STALE) in actions
    assert act.StartReplica("end_a", (1,), 1.0) in actions  # its successor, on a free GPU


def test_a_custom_image_replica_has_no_replica_key_and_stays() -> None:
    custom = endpoint(framework="custom", image="example/server:1")
    actions = plan([custom], [replica("r1")], [older("r1")])
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.READY, None)]


def test_a_replica_on_another_network_than_replicas_join_now_is_replaced() -> None:
    """In compose, replicas now have a network of their own, without Redis; one an older
    version put on the appliance's network (Redis's) is drained and started again there, a
    custom image's too. A replica on the network it should be on stays, as one does where
    replicas publish ports (no network)."""
    old = container("r1", **{"appliance.network": "appliance"})
    for framework in ("vllm", "custom"):
        actions = plan(
            [endpoint(framework=framework)], [replica("r1", gpus=[0])], [old],
            replica_network="appliance-replicas",
        )  # fmt: skip
        drained = [a for a in actions if isinstance(a, act.DrainReplica)]
        assert [d.replica_id for d in drained] == ["r1"], actions
        assert "network" in drained[0].why
    now = container("r1", **{"appliance.network": "appliance-replicas"})
    kept = plan([endpoint()], [replica("r1")], [now], replica_network="appliance-replicas")
    assert not [a for a in kept if isinstance(a, act.DrainReplica | act.StartReplica)]
    bare = plan([endpoint()], [replica("r1")], [container("r1")])
    assert not [a for a in bare if isinstance(a, act.DrainReplica | act.StartReplica)]


def test_replicas_this_version_started_are_kept() -> None:
    actions = plan([endpoint(framework="vllm")], [replica("r1")], [container("r1")])
    assert not [a for a in actions if isinstance(a, act.DrainReplica | act.StartReplica)]


LOADING = "Loading safetensors checkpoint shards: 50% Completed | 1/2"


def test_a_first_replica_starting_says_for_how_long_and_what_it_last_printed() -> None:
    starting = replica("r1", state=ReplicaState.STARTING, created_at=NOW - 97)
    actions = plan([endpoint()], [starting], last_lines={"r1": LOADING})
    reason = f"starting 1 replica (95 s): {LOADING}"
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, reason, False)]
    assert plan([endpoint(status_reason=reason)], [starting], last_lines={"r1": LOADING}) == []
    silent = plan([endpoint(status_reason=reason)], [starting], now=NOW + 5)  # no line yet
    no_line = "starting 1 replica (100 s)"
    assert silent == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, no_line, False)]
    two = replica("r2", state=ReplicaState.STARTING, created_at=NOW - 10)
    both = plan(
        [endpoint(min_replicas=2, desired_replicas=2, status_reason=reason)],
        [starting, two],
        last_lines={"r2": "INFO: waiting"},  # the oldest printed nothing yet: the other's line
    )
    later = "starting 2 replicas (95 s): INFO: waiting"
    assert both == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, later, False)]


def test_a_starting_reason_clears_to_ready_in_one_write() -> None:
    before = f"starting 1 replica (95 s): {LOADING}"
    actions = plan([endpoint(status_reason=before)], [replica("r1")])
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.READY, None)]


def test_starting_replicas_of_a_failed_start_leave_no_event_behind() -> None:
    before = f"starting 1 replica (95 s): {LOADING}"
    crash = crashed("r0", NOW - 1)
    actions = plan([endpoint(status_reason=before)], [crash])  # backing off: nothing starts
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, None, False)]


def test_no_starting_reason_once_the_generation_has_a_ready_replica_or_the_endpoint_is_ready() -> (
    None
):
    starting = replica("r2", state=ReplicaState.STARTING)
    two = endpoint(min_replicas=2, desired_replicas=2)
    assert plan([two], [replica("r1"), starting], last_lines={"r2": LOADING}) == []
    cold = endpoint(status=EndpointStatus.READY, min_replicas=0)  # a scale from zero
    assert plan([cold], [starting], last_lines={"r2": LOADING}) == []


def test_a_roll_shows_its_new_replica_starting_while_the_old_one_serves() -> None:
    old = replica("r1", generation=1)
    new = replica("r2", generation=2, state=ReplicaState.STARTING, gpus=[1], created_at=NOW - 7)
    actions = plan([endpoint(generation=2)], [old, new], last_lines={"r2": LOADING})
    reason = f"starting 1 replica (5 s): {LOADING}"
    assert actions == [act.SetStatus("end_a", 2, EndpointStatus.UPDATE_IN_PROGRESS, reason, False)]


GIB = 2**30
BOX = memory.for_replicas(24 * GIB)  # a 24 GiB box: 21.6 GiB for replicas


def cpu(eid: str, gib: float = 4, **kw: object) -> Endpoint:
    """A new CPU endpoint (`gpus: 0`, min 0) with a `gib` GiB memory limit."""
    fields: dict[str, object] = dict(
        id=eid,
        name=eid.removeprefix("end_"),
        gpus=0,
        memory_bytes=int(gib * GIB),
        min_replicas=0,
        status=EndpointStatus.UPDATE_PENDING,
    )
    fields.update(kw)
    return endpoint(**fields)


def on_cpu(rid: str, eid: str, **kw: object) -> Replica:
    return replica(rid, endpoint_id=eid, gpus=[], **kw)


def starts(actions: Sequence[act.Action]) -> list[str]:
    return [a.endpoint_id for a in actions if isinstance(a, act.StartReplica)]


def reasons(actions: Sequence[act.Action]) -> dict[str, str | None]:
    return {a.endpoint_id: a.reason for a in actions if isinstance(a, act.SetStatus)}


def test_an_eviction_names_another_teams_endpoint_to_neither_team() -> None:
    """The evicting endpoint's reason and the evicted one's events are read by their own
    teams: each names the other endpoint only when both are the same team's, as no listing
    tells one team another's endpoint names."""
    low = cpu(
        "end_low",
        name="red-secret-project",
        owner="red",
        gib=8,
        priority=0,
        status=EndpointStatus.READY,
        min_replicas=1,
        desired_replicas=2,
        last_request_at=NOW - 500,
    )
    high = cpu("end_high", name="blue-launch", owner="blue", gib=8, priority=10)
    replicas = [
        on_cpu("l1", "end_low", created_at=1.0),
        on_cpu("l2", "end_low", created_at=2.0),
    ]
    actions = plan([low, high], replicas, memory_bytes=20 * GIB, inflight={"l1": 1})
    why = "evicted for another team's endpoint (priority 10)"
    assert act.DrainReplica("l2", why) in actions
    assert act.SetDesired("end_low", 1, why) in actions
    assert reasons(actions)["end_high"] == (
        "waiting for memory: evicting an idle replica of another team's endpoint"
    )
    assert "red-secret-project" not in repr(actions) and "blue-launch" not in repr(actions)


def test_the_box_keeps_a_tenth_of_its_memory_at_least_a_gibibyte_at_most_half() -> None:
    assert memory.for_replicas(24 * GIB) == 24 * GIB - int(2.4 * GIB)
    assert memory.for_replicas(4 * GIB) == 3 * GIB
    assert memory.for_replicas(GIB) == GIB // 2


def test_cpu_replicas_start_only_while_their_memory_fits_and_the_rest_wait() -> None:
    """Ten new CPU endpoints with 4 GiB limits on a 24 GiB box: five start, five wait."""
    team = [cpu(f"end_{i:02}", created_at=float(i)) for i in range(10)]
    actions = plan(team, memory_bytes=BOX)
    assert starts(actions) == [f"end_{i:02}" for i in range(5)]
    why = "waiting for memory: needs 4.0 GiB, 1.6 GiB of the box's 21.6 GiB are free"
    assert reasons(actions) == {e.id: (why if i >= 5 else None) for i, e in enumerate(team)}


def test_starting_ready_and_draining_replicas_hold_their_memory_failed_ones_none() -> None:
    running = [
        on_cpu("r1", "end_b"),
        on_cpu("r2", "end_b", state=ReplicaState.STARTING),
        on_cpu("r3", "end_b", state=ReplicaState.STOPPING, state_since=NOW),
        on_cpu("r4", "end_b", state=ReplicaState.FAILED),
    ]
    b = cpu("end_b", gib=6, status=EndpointStatus.READY, min_replicas=2, desired_replicas=2)
    actions = plan([b, cpu("end_new", gib=4)], running, memory_bytes=BOX)
    why = "waiting for memory: needs 4.0 GiB, 3.6 GiB of the box's 21.6 GiB are free"
    assert actions == [act.SetStatus("end_new", 1, EndpointStatus.UPDATE_IN_PROGRESS, why)]
    assert starts(plan([b, cpu("end_new", gib=3.5)], running, memory_bytes=BOX)) == ["end_new"]


def test_a_replica_that_fits_starts_and_what_this_tick_started_counts() -> None:
    assert starts(plan([cpu("end_a", gib=21)], memory_bytes=BOX)) == ["end_a"]
    two = [cpu("end_a", gib=12, created_at=1.0), cpu("end_b", gib=12, created_at=2.0)]
    assert starts(plan(two, memory_bytes=BOX)) == ["end_a"]


def test_gpu_replicas_are_bounded_by_their_gpus_not_by_memory() -> None:
    """A GPU replica's weights live on its GPUs and its limit is a ceiling, not what it holds:
    on a 2-GPU box with 64 GiB, two default vLLM endpoints (64 GiB limits) both run."""
    gpu_one = endpoint(id="end_g", name="g", memory_bytes=16 * GIB)
    held = [replica("g1", endpoint_id="end_g", gpus=[0])]
    actions = plan([gpu_one, cpu("end_c", gib=8)], held, memory_bytes=BOX)
    assert act.StartReplica("end_c", (), 0.0) in actions  # the GPU replica holds none of it
    big_gpu = endpoint(id="end_h", name="h", memory_bytes=64 * GIB, created_at=1.0)
    actions = plan([gpu_one, big_gpu], held, memory_bytes=BOX)  # over the budget: no matter
    assert act.StartReplica("end_h", (1,), 1.0) in actions


def test_an_idle_lower_priority_replica_is_evicted_to_make_room_in_memory() -> None:
    low = cpu(
        "end_low",
        gib=8,
        priority=0,
        status=EndpointStatus.READY,
        min_replicas=1,
        desired_replicas=2,
        last_request_at=NOW - 500,
    )
    high = cpu("end_high", gib=8, priority=10)
    replicas = [
        on_cpu("l1", "end_low", created_at=1.0),
        on_cpu("l2", "end_low", created_at=2.0),
    ]
    actions = plan([low, high], replicas, memory_bytes=20 * GIB, inflight={"l1": 1})
    why = "evicted for high (priority 10)"
    assert act.DrainReplica("l2", why) in actions
    assert act.SetDesired("end_low", 1, why) in actions
    assert starts(actions) == []
    assert reasons(actions)["end_high"] == "waiting for memory: evicting an idle replica of low"
    # the same rules as for GPUs: never a busy one, never below the minimum, never an equal
    busy = plan([low, high], replicas, memory_bytes=20 * GIB, inflight={"l1": 1, "l2": 1})
    assert not any(isinstance(a, act.DrainReplica | act.SetDesired) for a in busy)
    at_min = plan(
        [low.model_copy(update={"min_replicas": 2}), high], replicas, memory_bytes=20 * GIB
    )
    assert not any(isinstance(a, act.DrainReplica | act.SetDesired) for a in at_min)
    peer = plan([low, high.model_copy(update={"priority": 0})], replicas, memory_bytes=20 * GIB)
    assert not any(isinstance(a, act.DrainReplica | act.SetDesired) for a in peer)


def test_no_eviction_when_the_victim_would_not_make_room() -> None:
    low = cpu("end_low", gib=2, status=EndpointStatus.READY, desired_replicas=1)
    peer = cpu("end_peer", gib=4, priority=10, status=EndpointStatus.READY, min_replicas=1)
    high = cpu("end_high", gib=8, priority=10)
    replicas = [on_cpu("l1", "end_low"), on_cpu("p1", "end_peer")]
    actions = plan([low, peer, high], replicas, memory_bytes=9 * GIB)
    assert not any(isinstance(a, act.DrainReplica) for a in actions)
    assert reasons(actions)["end_high"] == (
        "waiting for memory: needs 8.0 GiB, 3.0 GiB of the box's 9.0 GiB are free"
    )


def test_a_roll_counts_the_limit_its_old_containers_run_with() -> None:
    """memory went from 2 to 4 GiB: the old replica holds 2, so the new one surges beside it."""
    edited = cpu("end_a", gib=4, generation=2, status=EndpointStatus.UPDATE_PENDING, min_replicas=1)
    old = on_cpu("old", "end_a", generation=1)
    ran_with_2 = ContainerInfo("c-old", "old", container("old").labels, "running", 0, "x", 2 * GIB)
    actions = plan([edited], [old], [ran_with_2], memory_bytes=6 * GIB)
    assert starts(actions) == ["end_a"]
    no_surge = plan([edited], [old], [ran_with_2], memory_bytes=5 * GIB)
    assert act.DrainReplica("old", "making room for the new generation") in no_surge
    assert starts(no_surge) == []


def test_orphan_containers_hold_their_memory_until_removed() -> None:
    stray = ContainerInfo("c-ghost", "ghost", container("ghost").labels, "running", 0, "x", 8 * GIB)
    actions = plan(
        [cpu("end_a", gib=4)], [], [stray], first_seen={"c-ghost": NOW}, memory_bytes=10 * GIB
    )
    assert starts(actions) == []


def test_a_limit_over_the_box_takes_all_of_it_and_starts_only_alone() -> None:
    """Such a limit is a vLLM endpoint's default memory on a box under 64 GiB: its reason says
    what lets it start beside others (a `memory` of its own), since waiting will not."""
    whole = cpu("end_a", gib=23.5)
    assert starts(plan([whole], memory_bytes=BOX)) == ["end_a"]
    other = cpu("end_b", gib=1, status=EndpointStatus.READY, min_replicas=1)
    actions = plan([whole, other], [on_cpu("b1", "end_b")], memory_bytes=BOX)
    assert reasons(actions)["end_a"] == (
        "waiting for memory: needs all of the box's 21.6 GiB (its limit is 23.5 GiB), "
        "20.6 GiB are free; set the endpoint's `memory` to what it needs to start beside "
        "other replicas"
    )


def test_new_free_memory_figures_rewrite_the_reason_without_an_event() -> None:
    before = "waiting for memory: needs 4.0 GiB, 1.6 GiB of the box's 21.6 GiB are free"
    waiting = cpu("end_a", status=EndpointStatus.UPDATE_IN_PROGRESS, status_reason=before)
    others = [on_cpu(f"r{i}", "end_b") for i in range(4)]
    b = cpu("end_b", gib=4.5, status=EndpointStatus.READY, min_replicas=4, desired_replicas=4)
    actions = plan([b, waiting], others, memory_bytes=BOX)
    after = "waiting for memory: needs 4.0 GiB, 3.6 GiB of the box's 21.6 GiB are free"
    assert actions == [act.SetStatus("end_a", 1, EndpointStatus.UPDATE_IN_PROGRESS, after, False)]
    assert (
        plan([b, waiting.model_copy(update={"status_reason": after})], others, memory_bytes=BOX)
        == []
    )


def test_a_box_with_plenty_of_memory_plans_as_without_a_bound() -> None:
    """The GPU scenarios above (start, surge, roll one by one, evict) and CPU endpoints plan
    the same with memory to spare as with no bound at all."""
    two = Inventory(EIGHT.gpus[:2])
    low = endpoint(
        id="end_low",
        name="low",
        priority=0,
        min_replicas=1,
        desired_replicas=2,
        status=EndpointStatus.READY,
        last_request_at=NOW - 500,
    )
    high = endpoint(id="end_high", name="high", priority=10, status=EndpointStatus.UPDATE_PENDING)
    lows = [
        replica("l1", endpoint_id="end_low", gpus=[0], created_at=1.0),
        replica("l2", endpoint_id="end_low", gpus=[1], created_at=2.0),
    ]
    cases: list[tuple[list[Endpoint], list[Replica], dict[str, object]]] = [
        ([endpoint(status=EndpointStatus.UPDATE_PENDING)], [], {}),
        ([endpoint(generation=2)], [replica("old", generation=1)], {}),
        (
            [endpoint(generation=2)],
            [replica("old", generation=1)],
            {"inventory": Inventory(EIGHT.gpus[:1])},
        ),
        ([low, high], lows, {"inventory": two, "inflight": {"l1": 1}}),
        ([cpu(f"end_{i}") for i in range(8)], [], {"inventory": EMPTY}),
    ]
    for endpoints, replicas, kw in cases:
        assert plan(endpoints, replicas, memory_bytes=2**50, **kw) == plan(
            endpoints, replicas, **kw
        )
