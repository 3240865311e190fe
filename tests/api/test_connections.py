"""Connections the api does not keep: 2,000 half-sent requests (heads the fast lane waits on,
and heads too long for it that uvicorn's protocol waits on) are closed after the header
timeout, connections that never send a byte after the keep-alive timeout, and other clients
are served throughout (their p99 is printed, not asserted)."""

from __future__ import annotations

import contextlib
import json
import resource
import selectors
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.models import EndpointStatus
from forwarder.paths import BY_PATH
from tests.api.test_failed_endpoint import seed_bare
from tests.forwarder.test_async_support import FakeBackend, seed_endpoint
from tests.harness import ADMIN_KEY, Appliance, RedisServer, free_port, make_key, wait_until

HALF_SENT = 2000
LONG_HEADS = 100  # of them: over the lane's 16 KiB head limit, so uvicorn's protocol waits
IDLE = 50
HEADER_TIMEOUT_S = 3


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Appliance]:
    redis = RedisServer(tmp_path / "redis").start()
    env = {
        "APPLIANCE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        # every connection here comes from this one address, far past its default bound
        "APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "0",
    }
    appliance = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    yield appliance
    print(appliance.logs())
    appliance.stop()
    redis.stop()


def open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


def test_half_sent_and_idle_connections_are_closed(api: Appliance) -> None:
    open_files(HALF_SENT + IDLE + 1024)
    held: list[socket.socket] = []
    for i in range(HALF_SENT + IDLE):
        sock = socket.create_connection(("127.0.0.1", api.port), timeout=30)
        if i < LONG_HEADS:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nx-pad: " + b"a" * 17_000)
        elif i < HALF_SENT:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-le")
        held.append(sock)  # the last IDLE send nothing at all
    opened = time.monotonic()

    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def other_client() -> None:
        with httpx.Client(base_url=api.url, headers={"authorization": f"Bearer {ADMIN_KEY}"}) as c:
            while not stop.is_set():
                began = time.perf_counter()
                statuses.append(c.get("/v1/llm/model-endpoints").status_code)
                latencies.append(time.perf_counter() - began)
                time.sleep(0.02)

    client = threading.Thread(target=other_client)
    client.start()
    open_socks = set(held)
    watch = selectors.DefaultSelector()  # epoll: select() stops at descriptor 1024
    for sock in held:
        watch.register(sock, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 60
        while open_socks and time.monotonic() < deadline:
            for ready, _ in watch.select(1):
                sock = ready.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    closed = sock.recv(65536) == b""
                except OSError:
                    closed = True
                if closed:
                    open_socks.discard(sock)
                    watch.unregister(sock)
    finally:
        watch.close()
        stop.set()
        client.join()
        for sock in held:
            sock.close()
    took = time.monotonic() - opened
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else float("nan")
    print(
        f"{HALF_SENT} half-sent and {IDLE} idle connections: {len(held) - len(open_socks)} "
        f"closed within {took:.1f} s (header timeout {HEADER_TIMEOUT_S} s); other client: "
        f"{len(latencies)} requests, p99 {p99 * 1000:.1f} ms, median "
        f"{statistics.median(latencies) * 1000:.1f} ms"
    )
    assert not open_socks, f"{len(open_socks)} connections were never closed"
    assert statuses and set(statuses) == {200}, set(statuses)


def test_connections_over_the_cap_are_closed_at_once(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    api = Appliance(tmp_path / "api", redis, env_extra={"APPLIANCE_MAX_CONNECTIONS": "16"})
    api.start(roles=("api",))
    held = [socket.create_connection(("127.0.0.1", api.port), timeout=10) for _ in range(40)]
    try:
        refused = 0
        for sock in held[16:]:
            sock.settimeout(2)
            with contextlib.suppress(TimeoutError, OSError):
                refused += sock.recv(1) == b""
        assert refused >= len(held) - 16 - 2  # the health checks' own may still be closing
        for sock in held:
            sock.close()
        assert httpx.get(api.url + "/healthz", timeout=10).status_code == 200  # room again
    finally:
        for sock in held:
            sock.close()
        api.stop()
        redis.stop()
    print(f"{refused} of {len(held)} connections over the cap of 16 were closed at once")


@pytest.mark.parametrize("lane", ["true", "false"])
def test_one_address_holds_at_most_its_share_of_connections(tmp_path: Path, lane: str) -> None:
    """Held connections (half-sent bodies, idle ones) from one address stop at its bound: one
    more is told 429 and closed, while the api still has room for every other address; closing
    some makes room for that address again. The lane on and off, with one count for both."""
    redis = RedisServer(tmp_path / "redis").start()
    env = {"APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "24", "APPLIANCE_FAST_LANE": lane}
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    held: list[socket.socket] = []
    try:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + ADMIN_KEY.encode() + b"\r\ncontent-length: 1000\r\n\r\n{"
        )
        for i in range(24):
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            if i % 2:
                sock.sendall(head)  # a body still to come
            held.append(sock)
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = b""
            with contextlib.suppress(TimeoutError, OSError):
                while chunk := extra.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
        assert b"too many connections from this address" in answer
        assert b"connection: close" in answer.lower()
        for sock in held[:4]:
            sock.close()
        wait_until(  # room again, once the api has seen the closes
            lambda: httpx.get(api.url + "/healthz", timeout=10).status_code == 200, 10, "room"
        )
    finally:
        for sock in held:
            sock.close()
        print(api.logs())
        api.stop()
        redis.stop()


PACE_TIMEOUT_S = 2
TRICKLED = 100_000  # each body's length: far more than trickles in before the cut


def slow_heads() -> dict[str, bytes]:
    """A head for each way a body is read: the lane's (an inference route with a valid key),
    uvicorn's protocol (a management route), and a route that needs no key (the UI's sign-in)."""
    key = b"authorization: Bearer " + ADMIN_KEY.encode() + b"\r\n"
    json_type = b"content-type: application/json\r\n"
    return {
        "inference": b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + key + json_type,
        "management": b"POST /v1/llm/model-endpoints HTTP/1.1\r\nhost: x\r\n" + key + json_type,
        "sign-in": b"POST /ui/sign-in HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/x-www-form-urlencoded\r\n",
    }


@pytest.mark.parametrize("lane", ["true", "false"])
def test_a_body_that_trickles_in_is_answered_408_and_closed(tmp_path: Path, lane: str) -> None:
    """A body sent a byte at a time, each within the header timeout of the last, held its
    connection as long as the client went on (a few addresses could hold every connection):
    a body must bring 16 KiB a header timeout, or it is answered 408 and closed, on every
    route, keyed or not, the lane on and off. A body that keeps that pace is read whole."""
    redis = RedisServer(tmp_path / "redis").start()
    env = {"APPLIANCE_HEADER_TIMEOUT_S": str(PACE_TIMEOUT_S), "APPLIANCE_FAST_LANE": lane}
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    socks: dict[str, socket.socket] = {}
    try:
        # the key found valid once: the lane then reads a body itself (else uvicorn's does)
        known = httpx.post(
            api.url + "/v1/chat/completions",
            json={"model": "none", "messages": []},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert known.status_code == 404, known.text
        for name, head in slow_heads().items():
            sock = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            sock.sendall(head + b"content-length: %d\r\n\r\n{" % TRICKLED)
            sock.setblocking(False)
            socks[name] = sock
        answers = {name: b"" for name in socks}
        ended: dict[str, float] = {}
        began = time.monotonic()
        while len(ended) < len(socks) and time.monotonic() - began < 8 * PACE_TIMEOUT_S:
            for name, sock in socks.items():
                if name in ended:
                    continue
                with contextlib.suppress(OSError):
                    sock.send(b" ")
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue  # nothing yet
                except OSError:
                    chunk = b""
                answers[name] += chunk
                if not chunk:
                    ended[name] = time.monotonic() - began
            time.sleep(0.5)
        for name in socks:
            assert name in ended, f"{name}: still open after {8 * PACE_TIMEOUT_S} s"
            assert answers[name].startswith(b"HTTP/1.1 408 "), (name, answers[name][:300])
            assert b"request body came too slowly" in answers[name], answers[name]
        print(f"trickled bodies cut after {ended} s (header timeout {PACE_TIMEOUT_S} s)")

        # 20 KiB a second: slow, but at the pace; read whole and answered (the model is unknown)
        body = json.dumps({"model": "none", "messages": [], "pad": "x" * 60_000}).encode()
        with socket.create_connection(("127.0.0.1", api.port), timeout=30) as sock:
            head = slow_heads()["inference"] + b"content-length: %d\r\n\r\n" % len(body)
            sock.sendall(head)
            for at in range(0, len(body), 20_000):
                sock.sendall(body[at : at + 20_000])
                time.sleep(1)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]
    finally:
        for sock in socks.values():
            sock.close()
        print(api.logs())
        api.stop()
        redis.stop()


def exchange(port: int, request: bytes, wait_s: float = 5) -> bytes:
    """What the api answers `request` within `wait_s`, until it closes or goes quiet."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(request)
        with contextlib.suppress(TimeoutError, OSError):
            while chunk := sock.recv(65536):
                answer += chunk
                if answer.count(b"HTTP/1.1 ") >= request.count(b" HTTP/1.1\r\n"):
                    sock.settimeout(0.5)  # every head came: the last body's rest, if any
    return answer


@pytest.mark.parametrize("lane", ["true", "false"])
def test_a_request_asking_to_upgrade_is_served_as_http(tmp_path: Path, lane: str) -> None:
    """The api speaks HTTP/1.1 alone, and a request asking to switch protocols (`Upgrade: h2c`,
    as `curl --http2` sends on http://; `Upgrade: websocket`) is served as any other: its body
    is read (it was dropped, so a valid JSON body was a 400 "not valid JSON"), the connection
    carries the next request, a websocket handshake gets the key gate's 401 (it was handed to
    a websocket server that answered 403, or held the connection unanswered for a POST), and
    such connections leave their address's count when they close. The lane on and off."""
    redis = RedisServer(tmp_path / "redis").start()
    env = {"APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "4", "APPLIANCE_FAST_LANE": lane}
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    key = b"authorization: Bearer " + ADMIN_KEY.encode() + b"\r\n"
    body = b'{"model": "none", "messages": [{"role": "user", "content": "hi"}]}'
    h2c = b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQ\r\n"
    post = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    sized = b"content-length: %d\r\n\r\n%b" % (len(body), body)
    ws = (
        b"connection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    try:
        answer = exchange(api.port, post + key + h2c + sized + post + key + sized)
        assert answer.startswith(b"HTTP/1.1 404 "), answer[:400]
        assert answer.count(b"The model `none` does not exist.") == 2, answer
        answer = exchange(api.port, post + ws + sized)  # no key
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:400]
        handshake = b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + ws + b"\r\n"
        for _ in range(6):  # more than the address may hold at once, one after another: each
            # leaves the count once the api has seen it close (a moment after the client)
            answer = wait_until(
                lambda: (a := exchange(api.port, handshake))[:13] != b"HTTP/1.1 429 " and a,
                10,
                "a handshake not refused for the address's closed connections",
            )
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:400]
        answer = exchange(api.port, b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + key + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:400]
    finally:
        print(api.logs())
        api.stop()
        redis.stop()


SHARE = 2 * 2**20  # each key's share of the bodies in flight: its largest body, exactly
BUDGET_TIMEOUT_S = 3


def held_body(
    port: int, key: str, length: int = SHARE, sent: int = 1000, path: str = "/v1/chat/completions"
) -> socket.socket:
    """A connection whose request declares `length` bytes of body and sends `sent` of them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = (
        b"POST %b HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %b\r\ncontent-length: %d\r\n\r\n"
        % (path.encode(), key.encode(), length)
    )
    sock.sendall(head + b"{" + b" " * (sent - 1))
    return sock


def chunked_body(port: int, key: str, path: str = "/v1/chat/completions") -> bytes:
    """What the api answers a chunked body (carried over ASGI) of 120,000 bytes and more."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST %b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            b"authorization: Bearer %b\r\n\r\n" % (path.encode(), key.encode())
        )
        with contextlib.suppress(OSError):
            for _ in range(4):
                sock.sendall(b"%x\r\n%b\r\n" % (30_000, b" " * 30_000))
        return heard(sock)


def heard(sock: socket.socket, wait_s: float = 0.5) -> bytes:
    """What the api answered on `sock` within `wait_s` (b"" while it waits for the body)."""
    sock.settimeout(wait_s)
    answer = b""
    with contextlib.suppress(TimeoutError, OSError):
        while chunk := sock.recv(65536):
            answer += chunk
            sock.settimeout(0.5)
    return answer


def finish(sock: socket.socket, sent: int = 1000) -> bytes:
    """The rest of a `held_body` request's body (`"model": "none"` in it), and the answer."""
    rest = b'"model": "none", "messages": [], "pad": "'
    sock.sendall(rest + b"x" * (SHARE - sent - len(rest) - 2) + b'"}')
    return heard(sock, 10)


def hold_every_share(port: int, keys: list[str]) -> list[socket.socket]:
    """The first four keys each hold a body of their whole share (the whole budget): none is
    refused; one more body of the first key is a 429, of the fifth a 503, and a chunked body
    (ASGI's, counted as it comes) of the fifth key too."""
    held = [held_body(port, key) for key in keys[:4]]
    time.sleep(0.5)  # each head read, and its body's bytes taken
    for sock in held:
        assert heard(sock, 0.1) == b""
    over_share = heard(held_body(port, keys[0]))
    assert over_share.startswith(b"HTTP/1.1 429 "), over_share[:400]
    assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in over_share, over_share
    assert b"connection: close" in over_share.lower(), over_share
    assert json.loads(over_share.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 429
    over_all = heard(held_body(port, keys[4]))
    assert over_all.startswith(b"HTTP/1.1 503 "), over_all[:400]
    assert b"retry-after: 1\r\n" in over_all.lower(), over_all
    assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in over_all, over_all
    answer = chunked_body(port, keys[4])
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:400]
    return held


COLD, WARM, DEAD = "cold", "warm", "dead"  # of key 0's team: scaled to zero, served, unreachable
HOLD_S = 2  # APPLIANCE_ACTIVATION_TIMEOUT_S: how long a call waits for its cold start


def whole_body(port: int, key: str, model: str, length: int, **fields: object) -> socket.socket:
    """A connection whose request sends its whole body, a chat request of `length` bytes, at
    once with its head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    start = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    body = json.dumps({**start, "pad": ""}).encode()
    body = body[:-2] + b"x" * (length - len(body)) + b'"}'
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %b\r\ncontent-length: %d\r\n\r\n%b" % (key.encode(), length, body)
    )
    return sock


def hold_while_calls_wait(port: int, key: str) -> None:
    """A body read whole stays in the api's memory while its call waits (a cold start, here)
    and while it is relayed (kept for retries), so it holds its bytes until its call ends:
    meanwhile one more body over 64 KiB of its key, even one that came whole with its head,
    is past the key's share (429). Each way a call ends gives them back: refused after its
    hold (503), its client gone while it waits, answered, its client gone while relayed, its
    replica unreachable."""

    def past_the_share() -> None:
        answer = heard(whole_body(port, key, WARM, 1_200_000))
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:400]
        assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in answer, answer

    cold = whole_body(port, key, COLD, 1_200_000)
    time.sleep(0.5)
    past_the_share()
    assert heard(cold, HOLD_S + 5).startswith(b"HTTP/1.1 503 ")  # no replica after its hold
    with whole_body(port, key, COLD, 1_200_000):  # the client gone while it waits
        time.sleep(0.5)
        past_the_share()
    relayed = whole_body(port, key, WARM, 1_000_000, delay_s=1.5)
    time.sleep(0.5)
    past_the_share()
    assert heard(relayed, 10).startswith(b"HTTP/1.1 200 ")
    with whole_body(port, key, WARM, 1_000_000, delay_s=1.5):  # the client gone while relayed
        time.sleep(0.5)
        past_the_share()
    failed = heard(whole_body(port, key, DEAD, 1_200_000), 10)
    assert failed.startswith((b"HTTP/1.1 502 ", b"HTTP/1.1 503 ")), failed[:400]
    time.sleep(0.5)  # the closes seen


@pytest.mark.parametrize("lane", ["true", "false"])
def test_bodies_in_flight_are_bounded_by_key_and_by_process(tmp_path: Path, lane: str) -> None:
    """Each body still arriving held up to APPLIANCE_MAX_BODY_BYTES of the api's memory, so
    one ordinary key's slow bodies could hold hundreds of megabytes: a body over 64 KiB now
    takes its declared length from the process's APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT when its
    head comes, a key at most a quarter of it (429 past that) and all keys the whole (503 with
    Retry-After), and gives it back however its reading ends: read whole, the client gone, too
    slow (408), refused; and a body read whole holds it on until its call ends
    (`hold_while_calls_wait`). The second round finds the whole budget free again. Lane on
    and off."""
    redis = RedisServer(tmp_path / "redis").start()
    backend = FakeBackend().start()
    env = {
        "APPLIANCE_FAST_LANE": lane,
        "APPLIANCE_MAX_BODY_BYTES": str(SHARE),
        "APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT": str(4 * SHARE),
        "APPLIANCE_HEADER_TIMEOUT_S": str(BUDGET_TIMEOUT_S),
        "APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "APPLIANCE_ACTIVATION_TIMEOUT_S": str(HOLD_S),
        "APPLIANCE_ROUTING_REFRESH_S": "0.5",
    }
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    seed_bare(api.data_dir, COLD, EndpointStatus.READY, None)  # team t1's, scaled to zero
    seed_endpoint(api.data_dir, WARM, backend.address, owner="t1", endpoint_type="sync")
    unreachable = f"http://127.0.0.1:{free_port()}"
    seed_endpoint(api.data_dir, DEAD, unreachable, owner="t1", endpoint_type="sync")
    keys = [make_key(api, f"team{i}" if i else "t1", scopes=("inference",)) for i in range(5)]
    held: list[socket.socket] = []
    try:
        for key in keys:  # each key found valid once: the lane then reads its bodies itself
            known = httpx.post(
                api.url + "/v1/chat/completions",
                json={"model": "none", "messages": []},
                headers={"authorization": f"Bearer {key}"},
            )
            assert known.status_code == 404, known.text
        held = hold_every_share(api.port, keys)
        assert finish(held[0]).startswith(b"HTTP/1.1 404 ")  # read whole
        held[1].close()  # the client gone
        assert finish(held[3]).startswith(b"HTTP/1.1 404 ")
        too_slow = heard(held[2], 4 * BUDGET_TIMEOUT_S)
        assert too_slow.startswith(b"HTTP/1.1 408 "), too_slow[:400]
        time.sleep(0.5)  # the close seen
        for sock in held:
            sock.close()
        hold_while_calls_wait(api.port, keys[0])
        held = hold_every_share(api.port, keys)  # every byte given back: room for all again
        for sock in held:
            assert finish(sock).startswith(b"HTTP/1.1 404 ")
    finally:
        for sock in held:
            sock.close()
        print(api.logs())
        api.stop()
        redis.stop()
        backend.stop()


@pytest.mark.parametrize("lane", ["true", "false"])
def test_keys_a_key_makes_share_its_share_of_bodies_in_flight(tmp_path: Path, lane: str) -> None:
    """A key a team's key makes shares its maker's limits and counts; the bodies in flight were
    counted by each key's text, so an ordinary key made four keys and, with 64 trickling
    bodies, held the whole budget: every other team's bodies over 64 KiB were 503s for hours.
    Now a made key's bodies count in its maker's share (429 past it), and another team's
    body still finds room. Lane on and off (the chunked body is ASGI's)."""
    redis = RedisServer(tmp_path / "redis").start()
    env = {
        "APPLIANCE_FAST_LANE": lane,
        "APPLIANCE_MAX_BODY_BYTES": str(SHARE),
        "APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT": str(4 * SHARE),
        "APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "0",
    }
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    maker = make_key(api, "t1")
    made = [
        httpx.post(
            api.url + "/v1/api-keys",
            json={"name": f"made{i}"},
            headers={"authorization": f"Bearer {maker}"},
        ).json()["key"]
        for i in range(4)
    ]
    other = make_key(api, "t2", scopes=("inference",))
    held: list[socket.socket] = []
    try:
        for key in [maker, *made, other]:  # each found valid once, as in the test above
            known = httpx.post(
                api.url + "/v1/chat/completions",
                json={"model": "none", "messages": []},
                headers={"authorization": f"Bearer {key}"},
            )
            assert known.status_code == 404, known.text
        held = [held_body(api.port, made[0], SHARE // 2), held_body(api.port, made[1], SHARE // 2)]
        time.sleep(0.5)  # each head read, and its body's bytes taken
        assert [heard(sock, 0.1) for sock in held] == [b"", b""]
        for key in (maker, made[2]):
            over = heard(held_body(api.port, key, 100_000))
            assert over.startswith(b"HTTP/1.1 429 "), over[:400]
            assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in over, over
        chunked = chunked_body(api.port, made[3])
        assert chunked.startswith(b"HTTP/1.1 429 "), chunked[:400]
        held.append(held_body(api.port, other, SHARE))  # the other team's share is its own
        assert heard(held[-1], 0.5) == b""
    finally:
        for sock in held:
            sock.close()
        print(api.logs())
        api.stop()
        redis.stop()


def test_a_body_over_the_keys_share_is_answered_alike_on_every_inference_route(
    tmp_path: Path,
) -> None:
    """With its key's share held, a body is refused with the same answer on each inference
    route (in the route's envelope) whether the lane reads it (declared length) or ASGI does
    (chunked): status, Retry-After, content type and body bytes."""
    redis = RedisServer(tmp_path / "redis").start()
    env = {
        "APPLIANCE_MAX_BODY_BYTES": str(SHARE),
        "APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT": str(4 * SHARE),
        "APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "0",
    }
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    key = make_key(api, "team", scopes=("inference",))
    compared = ("content-type", "retry-after", "connection")
    try:
        known = httpx.post(  # the key found valid: the lane reads its bodies itself
            api.url + "/v1/chat/completions",
            json={"model": "none", "messages": []},
            headers={"authorization": f"Bearer {key}"},
        )
        assert known.status_code == 404, known.text
        with held_body(api.port, key) as holder:
            time.sleep(0.3)
            for path in BY_PATH:
                answers = [
                    heard(held_body(api.port, key, path=path)),
                    chunked_body(api.port, key, path),
                ]
                seen = []
                for answer in answers:
                    head, body = answer.split(b"\r\n\r\n", 1)
                    lines = head.decode().lower().split("\r\n")
                    fields = dict(line.split(": ", 1) for line in lines[1:])
                    seen.append((lines[0], {k: fields.get(k) for k in compared}, body))
                assert seen[0] == seen[1], (path, seen)
                assert seen[0][0].startswith("http/1.1 429 "), (path, seen[0])
                assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in seen[0][2]
            assert heard(holder, 0.1) == b""  # still waiting for its body
    finally:
        print(api.logs())
        api.stop()
        redis.stop()


def test_bodies_other_routes_read_whole_share_the_budget(tmp_path: Path) -> None:
    """Management routes and the UI's forms read their bodies (up to 2 MiB) whole into memory,
    which counted nowhere, so one key's (or, on the sign-in, which asks none, one address's)
    slow bodies could hold 2 MiB on each of its connections: they take from the same budget,
    by key (with its inference bodies) or by address where no key is asked, and give it back."""
    redis = RedisServer(tmp_path / "redis").start()
    most = 2 * 2**20
    env = {
        "APPLIANCE_MAX_BODY_BYTES": str(most),
        "APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT": str(4 * most),
        "APPLIANCE_MAX_CONNECTIONS_PER_ADDRESS": "0",
    }
    api = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    key = make_key(api, "team")
    manage = "/v1/llm/model-endpoints"
    sign_in = (
        b"POST /ui/sign-in HTTP/1.1\r\nhost: x\r\n"
        b"content-type: application/x-www-form-urlencoded\r\ncontent-length: %d\r\n\r\nkey="
    )
    try:
        with held_body(api.port, key, most, path=manage) as holder:
            time.sleep(0.3)
            for path in (manage, "/v1/chat/completions"):  # one share for both
                over = heard(held_body(api.port, key, 100_000, path=path))
                assert over.startswith(b"HTTP/1.1 429 "), (path, over[:400])
                assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in over, over
            assert heard(holder, 0.1) == b""
        time.sleep(0.5)  # the close seen
        with held_body(api.port, key, most, path=manage) as again:
            assert heard(again, 0.5) == b""  # the whole share again
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as holder:
            holder.sendall(sign_in % most)
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", api.port), timeout=10) as over_sock:
                over_sock.sendall(sign_in % 100_000)
                over = heard(over_sock)
            assert over.startswith(b"HTTP/1.1 429 "), over[:400]
            assert b"APPLIANCE_MAX_BODY_BYTES_IN_FLIGHT" in over, over
    finally:
        print(api.logs())
        api.stop()
        redis.stop()
