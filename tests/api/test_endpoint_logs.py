"""An endpoint's logs read from Redis as the builder ships them: the tail, then with `follow`
new lines as they come; a key follows at most `LOG_FOLLOWS_PER_KEY` streams at once (one more
is a 429 that says so, other keys unaffected), and open streams hold no thread, so many of
them do not hold up other requests."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from api.limits import LOG_FOLLOWS_PER_KEY, FollowSlots
from appliance import bus
from appliance.errors import RateLimitedError
from appliance.keys import Caller
from tests.forwarder.test_async_support import seed_endpoint
from tests.harness import Appliance, make_key, wait_until

LOGS_PATH = "/v1/model-endpoints/end_logged/logs"
LOG_KEY = bus.LOGS_KEY.format(replica="rep_logged")


@pytest.fixture
def logged(api_only: Appliance) -> Iterator[Appliance]:
    """The api with an endpoint of team red whose one replica printed three lines."""
    seed_endpoint(api_only.data_dir, "logged", "127.0.0.1:9", owner="red")
    store = redis.Redis.from_url(api_only.redis.url)
    for n in range(3):
        store.xadd(LOG_KEY, {"line": f"line {n}\n"})
    store.close()
    yield api_only


def follow(client: httpx.Client, stack: contextlib.ExitStack) -> httpx.Response:
    """A follow stream, open until `stack` closes."""
    return stack.enter_context(client.stream("GET", LOGS_PATH, params={"follow": 1}))


def test_a_key_follows_a_few_streams_at_once_and_others_are_unaffected(logged: Appliance) -> None:
    first, second = (logged.client(make_key(logged, "red")) for _ in range(2))
    with contextlib.ExitStack() as stack:
        streams = [follow(first, stack) for _ in range(LOG_FOLLOWS_PER_KEY)]
        assert [s.status_code for s in streams] == [200] * LOG_FOLLOWS_PER_KEY
        refused = follow(first, stack)  # a stream: unrefused, it would never end
        assert refused.status_code == 429
        message = refused.read() and refused.json()["detail"]
        assert f"{LOG_FOLLOWS_PER_KEY} log streams" in message, message
        assert int(refused.headers["retry-after"]) >= 1
        plain = first.get(LOGS_PATH)  # reading without follow is not counted
        assert plain.status_code == 200 and plain.text == "line 0\nline 1\nline 2\n"

        other = follow(second, stack)  # another key, same team: follows as usual
        assert other.status_code == 200
        lines = other.iter_lines()
        assert [next(lines) for _ in range(3)] == ["line 0", "line 1", "line 2"]
        store = redis.Redis.from_url(logged.redis.url)
        store.xadd(LOG_KEY, {"line": "a new line\n"})
        store.close()
        assert next(lines) == "a new line"  # followed as it came

        streams[0].close()  # one of the first key's streams ends: its slot is free again

        def follows_again() -> bool:
            with first.stream("GET", LOGS_PATH, params={"follow": 1}) as again:
                return again.status_code == 200

        wait_until(follows_again, 10, "the closed stream's slot to be given back")


def caller(key_id: str) -> Caller:
    return Caller(key_id, "u", "red", frozenset({"manage"}), is_admin=False)


def test_a_slot_comes_back_when_released_or_dropped() -> None:
    """A stream dropped before it ever ran (its client gone before the first byte) runs no
    code that could give its slot back: the slot is held weakly, so dropping it is enough."""
    slots = FollowSlots(most=2)
    first = [slots.take(caller("k1")), slots.take(caller("k1"))]
    with pytest.raises(RateLimitedError, match="already follows 2 log streams") as refused:
        slots.take(caller("k1"))
    assert refused.value.retry_after_s >= 1
    shared = Caller("k3", "u", "red", frozenset(), is_admin=False, counted_as="k1")
    with pytest.raises(RateLimitedError):
        slots.take(shared)  # a key sharing k1's limits shares its count too
    other = slots.take(caller("k2"))  # another key: unaffected
    first.pop().release()
    again = slots.take(caller("k1"))
    del first[0]  # dropped, never released
    last = slots.take(caller("k1"))
    with pytest.raises(RateLimitedError):
        slots.take(caller("k1"))
    assert None not in (other, again, last)


FOLLOWING_KEYS = 25  # 100 streams: blocked in a thread each, they held up other calls for 6 s


def test_a_hundred_follow_streams_and_a_plain_read_are_all_served(logged: Appliance) -> None:
    """Many keys' follows at once (the async Redis pool once failed the 101st connection), and
    a plain read beside them; how long it takes is printed, not asserted (timings are the
    benchmarks' to judge on this shared machine)."""
    clients = [logged.client(make_key(logged, "red")) for _ in range(FOLLOWING_KEYS)]
    with contextlib.ExitStack() as stack:
        opened = [follow(c, stack) for c in clients for _ in range(LOG_FOLLOWS_PER_KEY)]
        assert {s.status_code for s in opened} == {200}
        time.sleep(1)  # every stream is now waiting for new lines
        began = time.monotonic()
        plain = clients[0].get(LOGS_PATH, timeout=30)
        took = time.monotonic() - began
        assert plain.status_code == 200 and plain.text.startswith("line 0")
        print(f"a plain read took {took * 1000:.0f} ms beside {len(opened)} follow streams")


def read_to_end(stream: httpx.Response, within_s: float) -> list[str]:
    """The lines of `stream` until it ends, which it must within `within_s`."""
    lines: list[str] = []
    began = time.monotonic()
    for line in stream.iter_lines():
        lines.append(line)
        assert time.monotonic() - began < within_s, f"the stream is still open: {lines}"
    return lines


@pytest.mark.parametrize("ended_by", ["revoked", "expired"])
def test_a_followed_stream_ends_once_its_key_is_revoked_or_expired(
    logged: Appliance, ended_by: str
) -> None:
    """A key revoked (or run out) is refused on its next request, and a log stream it opened
    before ends too: following is not a way to keep reading an endpoint after losing the key."""
    admin = logged.client()
    expires = {"expires_in_seconds": 3} if ended_by == "expired" else {}
    made = admin.post("/v1/api-keys", json={"name": "ends", "team": "red", **expires})
    assert made.status_code == 201, made.text
    client = logged.client(made.json()["key"])
    store = redis.Redis.from_url(logged.redis.url)
    with client.stream("GET", LOGS_PATH, params={"follow": 1}, timeout=30) as stream:
        assert stream.status_code == 200
        if ended_by == "revoked":
            revoked = admin.delete(f"/v1/api-keys/{made.json()['id']}")
            assert revoked.status_code == 200, revoked.text
        store.xadd(LOG_KEY, {"line": "written while the stream is open\n"})
        lines = read_to_end(stream, within_s=15)
    store.close()
    why = "was revoked" if ended_by == "revoked" else "has expired"
    assert lines[-1] == f"[log stream ended: this API key {why}]"
    assert client.get(LOGS_PATH).status_code == 401
