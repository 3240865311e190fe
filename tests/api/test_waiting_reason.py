"""A request that waited its whole hold for a replica is told why none is ready when the builder
says (waiting for memory, for a GPU, pulling, starting), on every entry, in its envelope; an
endpoint the builder says nothing of gets the plain "retry shortly". Against a fake replica;
api and worker, no Docker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.models import EndpointStatus
from tests.api.test_admission import ASYNC, ENTRIES, Bed, refused, running_bed, tokens_field
from tests.api.test_failed_endpoint import seed_bare

HOLD_S = 2
WAITING, QUIET = "w1", "quiet"
MEMORY = "waiting for memory: needs 16.0 GiB, 10.2 GiB of the box's 21.2 GiB are free"
SYNC_ENTRIES = [entry for entry in ENTRIES if entry not in ASYNC and entry != "playground"]


def _seed(data_dir: Path, address: str) -> None:
    seed_bare(data_dir, WAITING, EndpointStatus.READY, MEMORY)  # scaled to zero, no room
    seed_bare(data_dir, QUIET, EndpointStatus.READY, None)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    env = {"APPLIANCE_ROUTING_REFRESH_S": "0.5", "APPLIANCE_ACTIVATION_TIMEOUT_S": str(HOLD_S)}
    with running_bed(tmp_path_factory.mktemp("waiting"), env, _seed) as made:
        yield made


@pytest.mark.parametrize("entry", SYNC_ENTRIES)
def test_the_503_after_the_hold_says_why_no_replica_is_ready(bed: Bed, entry: str) -> None:
    send, family, _ = ENTRIES[entry]
    reply = send(bed, bed.key(), WAITING, {tokens_field(entry): 1})
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        assert f"has no ready replica after {HOLD_S} s: {MEMORY}" in reply.text, reply.text
        return  # a stream that began while it waited: the same words as its error event
    refused(reply, 503, family)
    assert f"endpoint {WAITING!r} has no ready replica after {HOLD_S} s: {MEMORY}" in reply.text
    assert reply.headers["retry-after"] == "10"


def test_without_a_reason_it_is_the_plain_retry_shortly(bed: Bed) -> None:
    send = ENTRIES["/v1/chat/completions"][0]
    reply = send(bed, bed.key(), QUIET, {"max_tokens": 1})
    refused(reply, 503, "openai")
    assert (
        reply.json()["error"]["message"]
        == f"endpoint {QUIET!r} has no ready replica yet; retry shortly"
    )
