"""Request rates for the UI's charts and endpoints table, from the data plane's Prometheus
counters: the api samples its counters every few seconds (`api.routes.ui.sampler`),
adds each delta into 10-second buckets in Redis, and these pure functions turn the counters
into deltas and the buckets into series. Deltas, not totals, go to Redis so that several api
processes add up instead of overwriting each other."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

BUCKET_S = 10
WINDOW_S = 3600  # the charts show the last hour
KEPT_S = WINDOW_S + 120
FIELDS = ("requests", "latency_sum", "latency_count", "tokens")
RATES_KEY = "appliance:ui:rates:{endpoint}:{field}"  # hash: bucket start -> delta in it

Counters = dict[str, dict[str, float]]  # endpoint name -> field -> running total


def totals(families: Iterable[Any]) -> Counters:
    """Running totals per endpoint from collected Prometheus metric families."""
    out: Counters = {}

    def add(endpoint: str, field: str, value: float) -> None:
        fields = out.setdefault(endpoint, dict.fromkeys(FIELDS, 0.0))
        fields[field] += value

    for family in families:
        for sample in family.samples:
            endpoint = sample.labels.get("endpoint")
            if not endpoint:
                continue
            if sample.name == "appliance_requests_total":
                add(endpoint, "requests", sample.value)
            elif sample.name == "appliance_request_duration_seconds_sum":
                add(endpoint, "latency_sum", sample.value)
            elif sample.name == "appliance_request_duration_seconds_count":
                add(endpoint, "latency_count", sample.value)
            elif sample.name == "appliance_tokens_total" and sample.labels.get("kind") in (
                "completion",
            ):
                add(endpoint, "tokens", sample.value)
    return out


def deltas(before: Counters, after: Counters) -> Counters:
    """What changed between two samples; a counter that went down (restart) counts from 0."""
    out: Counters = {}
    for endpoint, fields in after.items():
        old = before.get(endpoint, {})
        change = {}
        for field, value in fields.items():
            prior = old.get(field, 0.0)
            change[field] = value - prior if value >= prior else value
        if any(change.values()):
            out[endpoint] = change
    return out


def bucket_of(now: float) -> int:
    return int(now // BUCKET_S) * BUCKET_S


@dataclass(frozen=True)
class Series:
    """Points (bucket start, value) of the last hour, oldest first."""

    requests_per_s: list[tuple[float, float]]
    latency_s: list[tuple[float, float]]
    tokens_per_s: list[tuple[float, float]]

    @property
    def empty(self) -> bool:
        return not any(v for _, v in self.requests_per_s)


def _by_bucket(raw: Mapping[Any, Any]) -> dict[int, float]:
    out = {}
    for bucket, value in raw.items():
        try:
            out[int(float(bucket))] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def series(raw: Mapping[str, Mapping[Any, Any]], now: float) -> Series:
    """Series from the Redis hashes (field -> bucket -> delta); buckets without requests are
    zeros for the rates and gaps for the latency, from the first bucket with data to now."""
    data = {field: _by_bucket(raw.get(field, {})) for field in FIELDS}
    last = bucket_of(now) - BUCKET_S  # the current bucket is still filling
    first_allowed = last - WINDOW_S + BUCKET_S
    seen = [b for b in data["requests"] if first_allowed <= b <= last]
    if not seen:
        return Series([], [], [])
    requests, latency, tokens = [], [], []
    for bucket in range(min(seen), last + BUCKET_S, BUCKET_S):
        n = data["requests"].get(bucket, 0.0)
        requests.append((float(bucket), n / BUCKET_S))
        tokens.append((float(bucket), data["tokens"].get(bucket, 0.0) / BUCKET_S))
        count = data["latency_count"].get(bucket, 0.0)
        if count:
            latency.append((float(bucket), data["latency_sum"].get(bucket, 0.0) / count))
    return Series(requests, latency, tokens)


def per_minute(raw_requests: Mapping[Any, Any], now: float) -> float:
    """Requests in the last minute of whole buckets."""
    last = bucket_of(now) - BUCKET_S
    return sum(v for b, v in _by_bucket(raw_requests).items() if last - 60 < b <= last)


def stale_buckets(raw: Mapping[Any, Any], now: float) -> list[int]:
    """Buckets older than the window (and a margin), for the sampler to drop."""
    return [b for b in _by_bucket(raw) if b < now - KEPT_S]
