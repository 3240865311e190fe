"""Prometheus metrics of the data plane, one registry per api process, served by `/metrics`.

Counters and histograms are updated once per request when it ends; in-flight gauges are read
from the forwarder's own counters at scrape time, so the hot path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
MAX_CACHED_CHILDREN = 10_000
WAIT_BUCKETS_S = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Inflight(Collector):
    """`appliance_inflight_requests{endpoint,replica}` from the forwarder's live counters."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "appliance_inflight_requests",
            "Requests the api has in flight to each replica.",
            labels=["endpoint", "replica"],
        )
        for endpoint, replica, count in self.read():
            gauge.add_metric([endpoint, replica], count)
        yield gauge


class Metrics:
    """The data plane's instruments, registered in their own registry."""

    def __init__(self, inflight: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "appliance_requests",
            "Inference requests by endpoint, key and HTTP status.",
            ["endpoint", "key", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "appliance_request_duration_seconds",
            "Time from a request's arrival to the end of its reply.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds",
            "Time from a streaming request's arrival to its first body chunk.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.overhead = Histogram(
            "appliance_overhead_seconds",
            "Time the appliance itself added to a request (waits excluded).",
            buckets=OVERHEAD_BUCKETS_S,
            registry=r,
        )
        self.tokens = Counter(
            "appliance_tokens",
            "Tokens reported by replicas, by endpoint, key and kind (prompt or completion).",
            ["endpoint", "key", "kind"],
            registry=r,
        )
        self.cold_wait = Histogram(
            "appliance_cold_start_wait_seconds",
            "Time requests waited for an endpoint to get a ready replica.",
            ["endpoint"],
            buckets=WAIT_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "appliance_queue_wait_seconds",
            "Time requests waited for a replica below its concurrency cap.",
            ["endpoint"],
            buckets=WAIT_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter(
            "appliance_upstream_retries",
            "Requests sent again to another replica after a connection failure.",
            ["endpoint"],
            registry=r,
        )
        self.ejections = Counter(
            "appliance_replica_ejections",
            "Replicas taken out of rotation after repeated failures.",
            ["endpoint"],
            registry=r,
        )
        r.register(_Inflight(inflight))
        self._children: dict[tuple[str, str, int], _Children] = {}

    def children(self, endpoint: str, key: str, code: int) -> _Children:
        """The labelled instruments of one request's outcome, looked up once and cached."""
        found = self._children.get((endpoint, key, code))
        if found is None:
            if len(self._children) > MAX_CACHED_CHILDREN:
                self._children.clear()
            found = _Children(
                requests=self.requests.labels(endpoint, key, str(code)),
                latency=self.latency.labels(endpoint),
                ttft=self.ttft.labels(endpoint),
                prompt_tokens=self.tokens.labels(endpoint, key, "prompt"),
                completion_tokens=self.tokens.labels(endpoint, key, "completion"),
            )
            self._children[(endpoint, key, code)] = found
        return found


@dataclass(frozen=True)
class _Children:
    requests: Counter
    latency: Histogram
    ttft: Histogram
    prompt_tokens: Counter
    completion_tokens: Counter


def inflight_rows(
    counts: Mapping[str, int], endpoint_of: Mapping[str, str]
) -> list[tuple[str, str, int]]:
    return [(endpoint_of.get(rid, ""), rid, n) for rid, n in counts.items()]
