"""The scaler's policy as a pure function of load and time: up fast, down after the window,
to zero when idle, clamped, and calm under an oscillating load."""

from __future__ import annotations

from appliance.models import Endpoint
from builder.scale import Decision, History, Load, decide, parse_server_load
from tests.factories import make_endpoint

T0 = 100_000.0


def endpoint(**kw: object) -> Endpoint:
    defaults = {
        "max_replicas": 5,
        "idle_timeout_s": 600,
        "scale_down_window_s": 300,
        "created_at": T0 - 10_000,
        "updated_at": T0 - 10_000,
    }
    return make_endpoint(**{**defaults, **kw})


class Run:
    """Feeds loads to the policy second by second, applying its decisions like the loop."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.history: History = ((T0, ep.desired_replicas),)
        self.changes: list[tuple[float, int]] = []

    def step(self, now: float, load: Load) -> Decision:
        decision = decide(self.ep, load, self.history, now)
        self.history = decision.history
        if decision.reason:
            self.ep.desired_replicas = decision.desired
            self.changes.append((now, decision.desired))
        return decision


def test_a_burst_scales_up_at_once_and_down_only_after_the_window() -> None:
    run = Run(endpoint())
    first = run.step(T0 + 1, Load(inflight=11, last_request_at=T0 + 1))
    assert first.desired == 3 and first.reason and "load 11" in first.reason
    for t in range(2, 300):
        run.step(T0 + t, Load(inflight=0, last_request_at=T0 + 1))
    assert run.ep.desired_replicas == 3
    down = run.step(T0 + 302, Load(inflight=0, last_request_at=T0 + 290))
    assert down.desired == 1 and down.reason and "for 300 s" in down.reason


def test_a_slow_ramp_follows_the_load_upward() -> None:
    run = Run(endpoint())
    for t in range(0, 200):
        run.step(T0 + t, Load(inflight=t // 10, last_request_at=T0 + t))
    assert [n for _, n in run.changes] == [2, 3, 4, 5]
    assert run.ep.desired_replicas == 5  # clamped at max


def test_an_oscillating_load_makes_few_scale_events() -> None:
    run = Run(endpoint())
    for t in range(0, 1800):
        busy = 16 if (t // 30) % 2 else 0  # 30 s on, 30 s off, for half an hour
        run.step(T0 + t, Load(inflight=busy, last_request_at=T0 + t))
    assert len(run.changes) <= 2, run.changes


def test_idle_goes_to_zero_when_min_is_zero_and_back_on_demand() -> None:
    run = Run(endpoint(min_replicas=0, idle_timeout_s=120))
    run.step(T0 + 10, Load(last_request_at=T0))
    assert run.ep.desired_replicas == 1
    zero = run.step(T0 + 121, Load(last_request_at=T0))
    assert zero.desired == 0 and zero.reason and "idle for 120 s" in zero.reason
    back = run.step(T0 + 500, Load(demand_at=T0 + 499, last_request_at=T0))
    assert back.desired == 1 and back.reason and "waiting" in back.reason


def test_a_new_endpoint_stays_warm_for_its_idle_timeout() -> None:
    fresh = endpoint(min_replicas=0, idle_timeout_s=3600, created_at=T0, updated_at=T0)
    assert decide(fresh, Load(), ((T0, 1),), T0 + 3000).desired == 1
    assert decide(fresh, Load(), ((T0, 1),), T0 + 3601).desired == 0


def test_async_endpoints_scale_on_their_backlog() -> None:
    queue = endpoint(endpoint_type="async", min_replicas=0, target_concurrency=10)
    assert decide(queue, Load(backlog=35), ((T0, 1),), T0).desired == 4
    queue.desired_replicas = 0
    assert decide(queue, Load(backlog=1), ((T0, 0),), T0).desired == 1


def test_clamps_to_min_and_max() -> None:
    assert decide(endpoint(max_replicas=2), Load(inflight=100), (), T0).desired == 2
    pinned = endpoint(min_replicas=3, desired_replicas=3)
    assert decide(pinned, Load(), (), T0 + 99_999).desired == 3


def test_server_metrics_count_running_and_waiting() -> None:
    page = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests",
            'vllm:num_requests_running{model_name="m"} 3.0',
            'vllm:num_requests_waiting{model_name="m"} 7.0',
            "vllm:prompt_tokens_total 99",
            "llamacpp:requests_processing 2",
            "llamacpp:requests_deferred 1",
        ]
    )
    assert parse_server_load(page) == (5, 8)
    run = decide(endpoint(), Load(inflight=2, server_running=3, server_waiting=7), (), T0)
    assert run.desired == 3  # ten busy requests over a target of four


def test_an_evicted_endpoint_stays_down_until_new_activity() -> None:
    ep = endpoint(min_replicas=0, desired_replicas=0, created_at=T0, updated_at=T0)
    evicted = Load(last_request_at=T0 + 5, evicted_at=T0 + 10)
    assert decide(ep, evicted, ((T0 + 10, 0),), T0 + 11).desired == 0
    used_again = Load(last_request_at=T0 + 20, evicted_at=T0 + 10, inflight=1)
    assert decide(ep, used_again, ((T0 + 10, 0),), T0 + 21).desired == 1


def test_scaling_up_names_its_cause_when_no_request_waits() -> None:
    """A scaled-to-zero endpoint woken by a roll (or a raised minimum) says so in its
    events, not that a request is waiting for a replica."""
    rolled = endpoint(min_replicas=0, desired_replicas=0, updated_at=T0, rolled_at=T0)
    woken = decide(rolled, Load(last_request_at=T0 - 5000), ((T0, 0),), T0 + 2)
    assert woken.desired == 1 and woken.reason
    assert "waiting" not in woken.reason and "after a new generation" in woken.reason
    raised = endpoint(min_replicas=2, desired_replicas=0)
    floor = decide(raised, Load(), ((T0, 0),), T0)
    assert floor.desired == 2 and floor.reason and "its minimum is 2" in floor.reason


def test_an_edit_that_does_not_roll_leaves_a_scaled_to_zero_endpoint_at_zero() -> None:
    """Labels, limits or `public_inference` changed on an endpoint at zero start no replica
    (an update that rolls its container does, above): only `rolled_at` counts as activity."""
    edited = endpoint(min_replicas=0, desired_replicas=0, updated_at=T0, rolled_at=T0 - 5000)
    assert decide(edited, Load(last_request_at=T0 - 5000), ((T0, 0),), T0 + 2).desired == 0


def test_an_endpoint_whose_max_is_zero_never_wants_a_replica() -> None:
    """max_workers 0 runs nothing: a request, a create or an update wants no replica of it, and
    no event says it scaled."""
    none = endpoint(min_replicas=0, max_replicas=0, desired_replicas=0, created_at=T0)
    asked = decide(none, Load(demand_at=T0 + 1, last_request_at=T0 + 1), ((T0, 0),), T0 + 2)
    assert asked.desired == 0 and asked.reason is None
