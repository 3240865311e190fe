"""The UI's pure helpers: deploy steps from events, request-rate buckets, form errors, charts."""

from __future__ import annotations

import re
from types import SimpleNamespace

from web import charts, forms, rates, render, views


def event(kind: str, message: str = "") -> dict[str, object]:
    return {"timestamp": 0.0, "kind": kind, "message": message}


def test_deploy_steps_follow_the_latest_deploy() -> None:
    events = [
        event("created"),
        event("placed", "replica rep_1 placed on CPU"),
        event("started", "replica rep_1 started"),
    ]
    steps = views.deploy_steps(events, "UPDATE_IN_PROGRESS")
    assert [s.state for s in steps] == ["done", "done", "done", "current", "todo"]
    assert steps[1].detail == "on CPU"
    pulling = [event("created"), event("pulling", "pulling image x")]
    assert [s.state for s in views.deploy_steps(pulling, "UPDATE_IN_PROGRESS")][:2] == [
        "current",
        "todo",
    ]
    pulled = [*pulling, event("pulled", "pulled image x: 1.0 GB in 60 s"), *events[1:]]
    assert views.deploy_steps(pulled, "UPDATE_IN_PROGRESS")[0].detail == "pulled"
    later = [*events, event("ready"), event("status", "READY"), event("updated")]
    assert views.deploy_steps(later, "UPDATE_PENDING")[0].state == "current"
    in_place = [*later[:-1], event("updated")]  # a replica-count edit: no new rollout
    assert [s.state for s in views.deploy_steps(in_place, "READY")] == ["done"] * 5
    crashed = [*events, event("crashed", "replica rep_1: exited 1")]
    assert views.deploy_steps(crashed, "UPDATE_FAILED")[3].state == "failed"
    # woken from zero replicas (the endpoint stays READY): its replica's steps as they go, and
    # Ready not "serving" beside a health check still in progress
    waking = [*in_place, event("placed", "replica rep_2 placed on CPU"), event("started")]
    steps = views.deploy_steps(waking, "READY")
    assert [s.state for s in steps] == ["done", "done", "done", "current", "todo"]
    assert steps[4].detail == ""
    woken = [*waking, event("ready", "replica rep_2 ready")]
    assert [(s.state, s.detail) for s in views.deploy_steps(woken, "READY")][3:] == [
        ("done", "passed"),
        ("done", "serving"),
    ]


def test_rates_from_counter_deltas_in_buckets() -> None:
    before = {"e": {"requests": 2.0, "latency_sum": 1.0, "latency_count": 2.0, "tokens": 10.0}}
    after = {"e": {"requests": 5.0, "latency_sum": 4.0, "latency_count": 5.0, "tokens": 40.0}}
    change = rates.deltas(before, after)
    assert change == {
        "e": {"requests": 3.0, "latency_sum": 3.0, "latency_count": 3.0, "tokens": 30.0}
    }
    assert rates.deltas(after, before)["e"]["requests"] == 2.0  # a restarted counter
    now = 10_000.0
    bucket = str(rates.bucket_of(now) - 20)
    raw = {field: {bucket: value} for field, value in change["e"].items()}
    series = rates.series(raw, now)
    assert series.requests_per_s[0] == (float(bucket), 0.3)
    assert series.latency_s == [(float(bucket), 1.0)]
    assert rates.per_minute(raw["requests"], now) == 3.0
    assert rates.per_minute(raw["requests"], now + 120) == 0.0
    assert rates.series({}, now).empty


def test_form_errors_land_on_form_fields() -> None:
    errors = forms.validation_errors(
        [
            {"loc": ("name",), "type": "string_pattern_mismatch", "msg": "x"},
            {"loc": ("max_workers",), "type": "greater_than_equal", "msg": "x", "ctx": {"ge": 0}},
            {"loc": ("per_worker",), "type": "int_parsing", "msg": "x"},
        ]
    )
    assert set(errors) == {"name", "max_replicas", "concurrency"}
    assert errors["max_replicas"] == "Must be 0 or more."
    assert forms.form_field("min_workers") == "min_replicas"
    assert forms.form_field("checkpoint_path") == "model"
    assert forms.form_field("unknown") == ""
    assert forms.form_message("min_workers must not exceed max_workers") == (
        "Min replicas must not exceed Max replicas"
    )
    assert forms.form_message("cpus '64' is more than this box has") == (
        "CPUs '64' is more than this box has"
    )
    current = {"model": "m.gguf", "min_replicas": "1", "max_replicas": "1", "public": ""}
    changed = forms.update_request({**current, "max_replicas": "2"}, current)
    assert changed == {"max_workers": "2"}


def test_bar_chart_shows_one_busy_bucket() -> None:
    chart = charts.bar_chart("Requests", "req/s", [(3590.0, 0.0), (3600.0, 0.5)], 0, 3610, 10)
    assert not chart.empty and len(chart.bars) == 1
    assert chart.bars[0].x + chart.bars[0].width <= charts.WIDTH
    assert charts.bar_chart("Requests", "req/s", [(1.0, 0.0)], 0, 10, 10).empty


def replicas_gpus_column(endpoint_gpus: int, replica_gpus: list[int]) -> str:
    endpoint = SimpleNamespace(
        status="UPDATE_FAILED", status_reason=None, gpus=endpoint_gpus, max_replicas=1
    )
    replica = {"id": "rep_1", "state": "failed", "gpus": replica_gpus, "generation": 1}
    public = {
        "replicas": [{**replica, "restarts": 0, "last_error": "exited 1"}],
        "progress": None,
        "deployment_state": {"available_workers": 0, "desired_workers": 1},
    }
    template = render.environment().get_template("_endpoint_live.html")
    page = template.render(
        endpoint=endpoint, public=public, steps=[], busy=False, charts=[], events=[]
    )
    row = re.search(r'<td class="mono">rep_1</td>.*?</td>\s*<td>([^<]*)</td>', page, re.S)
    assert row is not None
    return row.group(1)


def test_a_gpu_replica_that_holds_no_gpus_is_not_shown_on_the_cpu() -> None:
    """A failed replica of a GPU endpoint (its GPUs given back) showed "CPU"."""
    assert replicas_gpus_column(1, []) == "—"
    assert replicas_gpus_column(2, [0, 1]) == "0, 1"
    assert replicas_gpus_column(0, []) == "CPU"
