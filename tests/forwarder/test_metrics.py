"""The request counters the data plane keeps per request, as Prometheus reads them."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from forwarder.metrics import LATENCY_BUCKETS_S, OVERHEAD_BUCKETS_S, Metrics, exposition
from forwarder.relay import FAILURE_LOG_EVERY_S, FailureLog


def test_each_request_lands_in_the_buckets_prometheus_expects() -> None:
    metrics = Metrics(lambda: [])
    durations = [0.0, 0.01, 0.0100001, 1.0, 299.0, 300.0, 301.0]  # on, between, past bounds
    for duration in durations:
        metrics.stats.add("gemma", "key_a", 200, duration, 0.0005, None, (3, 4))
    text = exposition(metrics.registry, []).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    on = (("endpoint", "gemma"),)
    for bound in (*LATENCY_BUCKETS_S, float("inf")):
        expected = sum(1 for d in durations if d <= bound)  # `le`: a value on a bound is in it
        le = "+Inf" if bound == float("inf") else str(float(bound))
        bucket = ("appliance_request_duration_seconds_bucket", (*on, ("le", le)))
        assert samples[bucket] == expected, bound
    for bound in OVERHEAD_BUCKETS_S:
        bucket = ("appliance_overhead_seconds_bucket", (("le", str(bound)),))
        assert samples[bucket] == (len(durations) if bound >= 0.0005 else 0), bound
    by_key = (("code", "200"), ("endpoint", "gemma"), ("key", "key_a"))
    assert samples[("appliance_requests_total", by_key)] == len(durations)
    kind = (("endpoint", "gemma"), ("key", "key_a"), ("kind", "completion"))
    assert samples[("appliance_tokens_total", kind)] == 4 * len(durations)


def test_failures_are_logged_per_endpoint_without_flooding(caplog: Any) -> None:
    """A 5xx is a line naming the endpoint, the replica and why; a replica failing under load
    gives one line per endpoint and interval, the next saying how many were not logged."""
    now = [100.0]
    failures = FailureLog(clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="forwarder.relay"):
        for _ in range(50):
            failures.note("gemma", "rep_1", 502, "the replica closed the connection\nforged")
        failures.note("other", "rep_2", 504, "did not answer in time")
        now[0] += FAILURE_LOG_EVERY_S
        failures.note("gemma", "rep_1", 502, "again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "endpoint gemma, replica rep_1: 502, 'the replica closed the connection\\nforged'",
        "endpoint other, replica rep_2: 504, 'did not answer in time'",
        "endpoint gemma, replica rep_1: 502, 'again' (49 more since the last such line)",
    ]
