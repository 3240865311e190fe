"""Prometheus metrics of the data plane, one registry per api process, served by `/metrics`.

Each request adds to plain counters once when it ends (`RequestStats`), exported as counters
and histograms when scraped; in-flight gauges are read from the forwarder's own counters at
scrape time, so the hot path pays nothing for them. The rare events (waits, retries,
ejections) use prometheus_client's instruments directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# Typed as tuples of any length: compiled, a fixed-length tuple would be unboxed into a C struct
# and boxed again, a new tuple of floats, each time a request passes it to `_bucket`.
LATENCY_BUCKETS_S: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
OVERHEAD_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.1,
)
WAIT_BUCKETS_S: Final[tuple[float, ...]] = (0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _Collect(Collector):
    """A collector that yields what `collect` makes."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


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


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """`bisect.bisect_left(bounds, value)`: the index of the first bound not below `value`,
    `len(bounds)` past the last. A loop over a few bounds, which costs less compiled than
    a call to `bisect` with its argument parsing."""
    i = 0
    while i < len(bounds) and bounds[i] < value:
        i += 1
    return i


class _Histogram:
    """A histogram kept as plain numbers; exported as Prometheus's cumulative buckets."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bucket(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(
            (*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True
        ):
            running += count
            out.append((bound, running))
        return out


class RequestStats:
    """What every finished request adds: counted in plain dicts on the hot path (a few
    hundred nanoseconds, where prometheus_client's locked children cost microseconds) and
    turned into metric families only when scraped. Only the event loop's thread touches it.
    Registered through `_Collect`: with no Python base class it compiles (`setup.py`) to a
    native class, whose `add` the fast lane calls directly."""

    def __init__(self) -> None:
        # (endpoint, key, code) -> [requests, prompt tokens, completion tokens]
        self.rows: dict[tuple[str, str, int], list[int]] = {}
        self.latency: dict[str, _Histogram] = {}
        self.ttft: dict[str, _Histogram] = {}
        self.overhead = _Histogram(OVERHEAD_BUCKETS_S)
        self.fast_lane = 0  # of the requests, how many the api's fast lane served

    def add(
        self,
        endpoint: str,
        key: str,
        code: int,
        duration_s: float,
        overhead_s: float | None,
        ttft_s: float | None,
        usage: tuple[int, int] | None,
    ) -> None:
        row = self.rows.get((endpoint, key, code))
        if row is None:
            row = self.rows[(endpoint, key, code)] = [0, 0, 0]
        row[0] += 1
        if usage is not None:
            row[1] += usage[0]
            row[2] += usage[1]
        latency = self.latency.get(endpoint)
        if latency is None:
            latency = self.latency[endpoint] = _Histogram(LATENCY_BUCKETS_S)
            self.ttft[endpoint] = _Histogram(LATENCY_BUCKETS_S)
        latency.counts[_bucket(LATENCY_BUCKETS_S, duration_s)] += 1  # observe(), inlined
        latency.total += duration_s
        if overhead_s is not None:
            overhead = self.overhead
            overhead.counts[_bucket(OVERHEAD_BUCKETS_S, overhead_s)] += 1
            overhead.total += overhead_s
        if ttft_s is not None:
            self.ttft[endpoint].observe(ttft_s)

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "appliance_requests",
            "Inference requests by endpoint, key and HTTP status.",
            labels=["endpoint", "key", "code"],
        )
        tokens_of: dict[tuple[str, str], list[int]] = {}
        for (endpoint, key, code), (count, prompt, completion) in list(self.rows.items()):
            requests.add_metric([endpoint, key, str(code)], count)
            if prompt or completion:
                mine = tokens_of.setdefault((endpoint, key), [0, 0])
                mine[0] += prompt
                mine[1] += completion
        yield requests
        yield self._histograms(
            "appliance_request_duration_seconds",
            "Time from a request's arrival to the end of its reply.",
            self.latency,
        )
        yield self._histograms(
            "appliance_time_to_first_token_seconds",
            "Time from a streaming request's arrival to its first body chunk.",
            self.ttft,
        )
        overhead = HistogramMetricFamily(
            "appliance_overhead_seconds",
            "Time the appliance itself added to a request (waits excluded).",
        )
        overhead.add_metric([], self.overhead.buckets(), self.overhead.total)
        yield overhead
        tokens = CounterMetricFamily(
            "appliance_tokens",
            "Tokens reported by replicas (a stream cut short: its events sent, its prompt "
            "estimated from its size), by endpoint, key and kind (prompt or completion).",
            labels=["endpoint", "key", "kind"],
        )
        for (endpoint, key), (prompt, completion) in tokens_of.items():
            tokens.add_metric([endpoint, key, "prompt"], prompt)
            tokens.add_metric([endpoint, key, "completion"], completion)
        yield tokens
        yield CounterMetricFamily(
            "appliance_fast_lane_requests",
            "Inference requests served on the api's fast lane (the rest took the general path).",
            value=self.fast_lane,
        )

    @staticmethod
    def _histograms(name: str, doc: str, by_endpoint: dict[str, _Histogram]) -> Metric:
        family = HistogramMetricFamily(name, doc, labels=["endpoint"])
        for endpoint, histogram in list(by_endpoint.items()):
            family.add_metric([endpoint], histogram.buckets(), histogram.total)
        return family


class Metrics:
    """The data plane's instruments, registered in their own registry."""

    def __init__(self, inflight: Callable[[], Iterable[tuple[str, str, int]]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stats = RequestStats()
        r.register(_Collect(self.stats.collect))
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


Snapshot = list[Any]  # [name, type, documentation, [[sample name, labels, value], ...]]
SHARED_TYPES = frozenset({"counter", "histogram"})


def snapshot(registry: CollectorRegistry) -> list[Snapshot]:
    """This process's counters and histograms, JSON-ready, for the other api workers."""
    return [
        [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
        for f in registry.collect()
        if f.type in SHARED_TYPES
    ]


def exposition(registry: CollectorRegistry, others: Iterable[list[Snapshot]]) -> bytes:
    """Prometheus text of `registry` with the other workers' counters and histograms added
    in (gauges are this process's: the in-flight ones already count every worker)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in registry.collect():
        families[family.name] = family
        if family.type in SHARED_TYPES:
            values[family.name] = {
                (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
            }
    for worker in others:
        for name, kind, documentation, samples in worker:
            if name not in families:
                families[name] = Metric(name, documentation, kind)
                values[name] = {}
            mine = values.setdefault(name, {})
            for sample_name, labels, value in samples:
                if sample_name.endswith("_created"):
                    continue  # a timestamp, not a count
                key = (sample_name, tuple(sorted(labels.items())))
                mine[key] = mine.get(key, 0.0) + value
    for name, summed in values.items():
        family = families[name]
        family.samples = []
        for (sample_name, labels), value in summed.items():
            family.add_sample(sample_name, dict(labels), value)
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Fixed(list(families.values())))
    return generate_latest(merged)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def inflight_rows(
    counts: Mapping[str, int], endpoint_of: Mapping[str, str]
) -> list[tuple[str, str, int]]:
    return [(endpoint_of.get(rid, ""), rid, n) for rid, n in counts.items()]
