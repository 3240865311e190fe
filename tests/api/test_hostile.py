"""Hostile input against a running api: every number bounded (a 400 naming the field on LLM
Engine's routes, never a 500), the keep-alive connection kept after an error, bodies over a
route's limit refused before the key and before parsing, request heads over the bound refused
431 with the fast lane on and off, and the favicon served without a key."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from appliance import bus
from tests.harness import ADMIN_KEY, SHARED_POOL, Appliance, RedisServer, make_key

EIGHT_GPUS = Path(__file__).parents[1] / "gpu" / "eight_h100.json"


def body(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model_name": "acme/standin-1b",
        "inference_framework": "vllm",
        "gpus": 0,
        "min_workers": 0,
        "max_workers": 1,
        "per_worker": 2,
        **fields,
    }


class Raw:
    """One keep-alive HTTP/1.1 connection, read and written by hand, so a test sees whether
    the server kept it open after an answer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""

    def ask(self, method: str, path: str, data: bytes = b"", key: str = ADMIN_KEY) -> int:
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)
        status, _ = self.answer()
        return status

    def answer(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        status = int(lines[0].split()[1])
        if headers.get("transfer-encoding") == "chunked":
            return status, self._chunks()
        length = int(headers.get("content-length", "0"))
        return status, self._take(length)

    def _take(self, length: int) -> bytes:
        while len(self.buf) < length:
            self._more()
        data, self.buf = self.buf[:length], self.buf[length:]
        return data

    def _chunks(self) -> bytes:
        data = b""
        while True:
            while b"\r\n" not in self.buf:
                self._more()
            size, _, self.buf = self.buf.partition(b"\r\n")
            chunk = self._take(int(size, 16) + 2)[:-2]
            if not chunk:
                return data
            data += chunk

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk


def nested(depth: int) -> list[Any]:
    """A list nested `depth` levels deep: stored, a reply could not serialise it past 255."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def hostile_cases(team_key: str) -> list[tuple[str, dict[str, Any] | bytes, str, str]]:
    """(what, body, key, field the 400 must name)."""
    gguf = {"inference_framework": "llamacpp", "model_name": "x.gguf", "gpus": 0}
    return [
        ("per_worker 2^70", body("a", per_worker=2**70), ADMIN_KEY, "per_worker"),
        ("startup 1e30", body("a", startup_timeout_seconds=1e30), ADMIN_KEY, "startup_timeout"),
        ("idle 2^64", body("a", idle_timeout_seconds=2**64), ADMIN_KEY, "idle_timeout_seconds"),
        ("priority 2^63", body("a", priority=2**63), ADMIN_KEY, "priority"),
        ("cpus nan", body("a", cpus="nan"), ADMIN_KEY, "cpus"),
        ("cpus inf", body("a", cpus="inf"), ADMIN_KEY, "cpus"),
        ("cpus 1e6", body("a", cpus=1e6), ADMIN_KEY, "cpus"),
        ("cpus 0", body("a", cpus="0"), ADMIN_KEY, "cpus '0' is less than the least"),
        ("memory 0", body("a", memory=0), ADMIN_KEY, "memory"),
        ("memory 1Ki", body("a", memory="1Ki"), ADMIN_KEY, "memory"),
        ("memory past the box", body("a", memory="4096Ti"), ADMIN_KEY, "memory"),
        ("gpus 10^6", body("a", gpus=1_000_000), ADMIN_KEY, "gpus"),
        ("seed 2^64", body("a", seed=2**64, **gguf), ADMIN_KEY, "seed"),
        ("template 200 KB", body("a", chat_template="x" * 200_000), ADMIN_KEY, "chat_template"),
        ("timeout NaN", b'{"name": "a", "model_name": "x/y", "timeout_seconds": NaN}', ADMIN_KEY,
         "timeout_seconds"),
        ("metadata Infinity", b'{"name": "a", "model_name": "x/y", "metadata": {"m": [Infinity]}}',
         ADMIN_KEY, "metadata.m[0]"),
        ("metadata 300 deep", body("a", metadata={"deep": nested(300)}), team_key, "metadata.deep"),
        ("rope_scaling 40 deep", body("a", rope_scaling=nested(40)), ADMIN_KEY, "rope_scaling"),
        ("limit_mm_per_prompt a number", body("a", limit_mm_per_prompt=-1), team_key,
         "limit_mm_per_prompt"),
        ("mm_processor_kwargs a string", body("a", mm_processor_kwargs="x"), team_key,
         "mm_processor_kwargs"),
        ("a team's priority", body("a", priority=5), team_key, "priority"),
        ("a team's high_priority", body("a", high_priority=True), team_key, "high_priority"),
        ("revision out of the cache", body("a", revision="../../../tmp/x"), team_key, "revision"),
        ("tokenizer_revision absolute", body("a", tokenizer_revision="/etc"), team_key,
         "tokenizer_revision"),
    ]  # fmt: skip


def test_every_number_is_bounded_and_the_connection_survives(api_only: Appliance) -> None:
    team = make_key(api_only, "red")
    conn = Raw(api_only.port)
    for what, sent, key, field in hostile_cases(team):
        data = sent if isinstance(sent, bytes) else json.dumps(sent).encode()
        for path in ("/v1/llm/model-endpoints", "/v1/model-endpoints"):
            conn.sock.sendall(
                f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                + data
            )
            status, reply = conn.answer()
            assert status == 400, (what, path, status, reply[:300])
            assert field in reply.decode(), (what, reply[:300])
            json.loads(reply)  # strict JSON: no NaN echoed back
        assert conn.ask("GET", "/v1/llm/model-endpoints") == 200, what  # same connection
    made = api_only.client().get("/v1/llm/model-endpoints").json()["model_endpoints"]
    assert made == []


def mark_ready(appliance: Appliance) -> None:
    """What the builder would do once replicas serve (the api runs alone here)."""
    from sqlmodel import select

    from appliance.db import open_engine, session_scope
    from appliance.models import Endpoint, EndpointStatus

    engine = open_engine(appliance.data_dir / "appliance.db")
    with session_scope(engine) as session:
        for endpoint in session.exec(select(Endpoint)).all():
            endpoint.status = EndpointStatus.READY
            session.add(endpoint)
    engine.dispose()


def test_an_update_is_bounded_too(api_only: Appliance) -> None:
    admin = api_only.client()
    assert admin.post("/v1/llm/model-endpoints", json=body("b")).status_code == 200
    team = api_only.client(make_key(api_only, "red"))
    assert team.post("/v1/llm/model-endpoints", json=body("c")).status_code == 200
    mark_ready(api_only)
    for change, field in [
        ({"per_worker": 2**70}, "per_worker"),
        ({"cpus": "nan"}, "cpus"),
        ({"memory": 0}, "memory"),
        ({"priority": -(2**63)}, "priority"),
        ({"metadata": {"x": 2.0, "y": [float("inf")]}}, "metadata.y[0]"),
        ({"metadata": {"x": nested(300)}}, "nested more than"),
        ({"extra_flags": {"--cpu-offload-gb": 10**400}}, "extra_flags"),  # past any float
        ({"extra_flags": {"--max-logprobs": 10**400}}, "extra_flags"),
    ]:
        reply = admin.put(
            "/v1/llm/model-endpoints/b",
            content=json.dumps(change).encode(),
            headers={"content-type": "application/json"},
        )
        assert reply.status_code == 400 and field in reply.text, (change, reply.text)
        assert "Value error" not in reply.text  # pydantic's prefix says nothing to a user
    refused = team.put("/v1/llm/model-endpoints/c", json={"priority": 1})
    assert refused.status_code == 400 and "priority" in refused.text


NUL = "\u0000"
# Every string that reaches a container, with a NUL in it, and the field the refusal names
CARRIED_CASES = [
    ({"env": {"VLLM_LOGGING_LEVEL": f"DEBUG{NUL}X=1"}}, "env.VLLM_LOGGING_LEVEL"),
    ({"env": {f"VLLM_LOGGING{NUL}LEVEL": "DEBUG"}}, "env."),
    ({"env": {"VLLM_LOGGING_LEVEL\n": "DEBUG"}}, "env"),  # a newline after a name
    ({"chat_template": f"{{{{ messages }}}}{NUL}"}, "chat_template"),
    ({"chat_template_override": f"{{% for m in messages %}}{NUL}{{% endfor %}}"}, "chat_template"),
    ({"model_name": f"acme/standin-1b{NUL}"}, "model_name"),
    ({"tokenizer": f"acme/tok{NUL}"}, "tokenizer"),
    ({"served_model_name": f"n{NUL}"}, "served_model_name"),
    ({"extra_flags": {"--reasoning-parser": f"x{NUL}"}}, "extra_flags"),
]


def test_a_string_no_container_can_carry_is_refused_naming_its_field(
    api_only: Appliance,
) -> None:
    """A NUL reaches the container runtime only when a replica starts (UPDATE_FAILED, "environment
    variable value can't contain null"): refused on create and update, on every route."""
    admin = api_only.client()
    for change, field in CARRIED_CASES:
        for path in ("/v1/llm/model-endpoints", "/v1/model-endpoints"):
            reply = admin.post(path, json=body("n", **change))
            assert reply.status_code == 400 and field in reply.text, (change, path, reply.text)
        applied = admin.post("/v1/config/apply", json={"endpoints": [body("n", **change)]})
        assert applied.status_code == 422 and field in applied.text, (change, applied.text)
    custom = {"inference_framework": "custom", "image": "x", "command": ["serve", f"--a{NUL}"]}
    reply = admin.post("/v1/llm/model-endpoints", json=body("n", **custom))
    assert reply.status_code == 400 and "command" in reply.text, reply.text
    assert admin.get("/v1/llm/model-endpoints").json()["model_endpoints"] == []

    assert admin.post("/v1/llm/model-endpoints", json=body("u")).status_code == 200
    mark_ready(api_only)
    made = admin.get("/v1/llm/model-endpoints/u").json()
    for change, field in CARRIED_CASES:
        reply = admin.put("/v1/llm/model-endpoints/u", json=change)
        assert reply.status_code == 400 and field in reply.text, (change, reply.text)
        by_id = admin.put(f"/v1/model-endpoints/{made['id']}", json=change)
        assert by_id.status_code == 400 and field in by_id.text, (change, by_id.text)
    assert admin.get("/v1/llm/model-endpoints/u").json()["status"] == "READY"  # nothing rolled


# JSON takes a lone surrogate as an escape (Python's json.loads reads it into a str), but no
# reply can carry one in UTF-8: stored, every GET and list holding it failed with a 500.
SURROGATE_CASES = [
    ('{"labels": {"k": "\\ud800"}}', "labels.k"),
    ('{"labels": {"\\udc00": "v"}}', "labels"),
    ('{"metadata": {"a": ["x", {"b": "\\ud800"}]}}', "metadata.a[1].b"),
    ('{"mm_processor_kwargs": {"\\ud800": 1}}', "mm_processor_kwargs"),
    ('{"metadata": {"\\udc00": "\\ud800"}}', "metadata"),  # the path holds no surrogate
]


def test_a_string_no_reply_can_carry_is_refused_naming_its_field(api_only: Appliance) -> None:
    """Refused on create, update and apply, so the endpoint's GET, every list holding it (an
    administrator's lists every team's) and `/v1/config` keep answering."""
    admin = api_only.client()
    made = admin.post("/v1/llm/model-endpoints", json=body("s"))
    assert made.status_code == 200, made.text
    mark_ready(api_only)
    json_type = {"content-type": "application/json"}
    for change, field in SURROGATE_CASES:
        sent = json.dumps(body("n"))[:-1] + ", " + change[1:]
        for path in ("/v1/llm/model-endpoints", "/v1/model-endpoints"):
            reply = admin.post(path, content=sent.encode(), headers=json_type)
            assert reply.status_code == 400 and field in reply.text, (change, path, reply.text)
        reply = admin.put("/v1/llm/model-endpoints/s", content=change.encode(), headers=json_type)
        assert reply.status_code == 400 and field in reply.text, (change, reply.text)
        applied = admin.post(
            "/v1/config/apply",
            content=('{"endpoints": [' + sent + "]}").encode(),
            headers=json_type,
        )
        assert applied.status_code == 422 and field in applied.text, (change, applied.text)
    for path in ("/v1/llm/model-endpoints", "/v1/model-endpoints", "/v1/config"):
        assert admin.get(path).status_code == 200, path
    assert admin.get("/v1/llm/model-endpoints/s").status_code == 200


def test_gpus_past_the_box_is_a_400_that_says_how_many_it_has(api_only: Appliance) -> None:
    store = redis.Redis.from_url(api_only.redis.url)
    store.set(bus.GPUS_KEY, EIGHT_GPUS.read_text())  # as the builder reports them
    store.close()
    admin = api_only.client()
    reply = admin.post("/v1/llm/model-endpoints", json=body("g", gpus=9, num_shards=9))
    assert reply.status_code == 400 and "8 GPUs" in reply.text, reply.text
    fits = admin.post("/v1/llm/model-endpoints", json=body("g", gpus=8, num_shards=8))
    assert fits.status_code == 200, fits.text


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


BIG = 300 * 1024 * 1024
CLIENTS = 10


def send_big(port: int, path: str, chunked: bool, answers: list[int]) -> None:
    """A 300 MB body with a made-up key, sent until the server answers (or hangs up)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {BIG}"
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer mea_made_up_key\r\n"
        f"content-type: application/json\r\n{framing}\r\n\r\n".encode()
    )
    piece = b"[" + b"1," * 32767 + b"1"
    framed = b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece
    sent = 0
    try:
        while sent < BIG:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            sock.sendall(framed)
            sent += len(piece)
    except OSError:
        pass  # the server may hang up once it has answered: read its answer
    try:
        head = sock.recv(65536)
        answers.append(int(head.split()[1]) if head else 0)
    except OSError as exc:
        answers.append(0)  # hung up without an answer: counted as a failure
        print(f"{path} chunked={chunked} after {sent} bytes: {exc!r}")
    finally:
        sock.close()


def test_huge_bodies_without_a_valid_key_are_never_read(api_only: Appliance) -> None:
    """Ten parallel 300 MB bodies to management routes, half with a declared length, half
    chunked: each is answered 401 or 413 and the api's peak memory grows by under 50 MB."""
    pid = api_only.procs["api"].pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the present size
    before = peak_rss_bytes(pid)
    answers: list[int] = []
    paths = ["/v1/llm/model-endpoints", "/v1/api-keys", "/v1/config/apply", "/v1/files"]
    threads = [
        threading.Thread(
            target=send_big, args=(api_only.port, paths[i % len(paths)], i % 2 == 1, answers)
        )
        for i in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    grown = peak_rss_bytes(pid) - before
    print(f"peak memory grew by {grown / 2**20:.1f} MiB over {CLIENTS} bodies of 300 MB")
    assert sorted(answers) == sorted(a for a in answers if a in (401, 413)), answers
    assert len(answers) == CLIENTS
    assert grown < 50 * 2**20


def test_a_management_body_over_its_limit_is_413_before_the_key(api_only: Appliance) -> None:
    conn = Raw(api_only.port)
    big = json.dumps(body("a", metadata={"x": "y" * 3_000_000})).encode()
    assert conn.ask("POST", "/v1/llm/model-endpoints", big, key="mea_made_up") == 413
    small = Raw(api_only.port)
    assert small.ask("POST", "/v1/api-keys", b'{"name": 1}', key="mea_made_up") == 401
    assert small.ask("POST", "/v1/api-keys", b'{"name": 1}') == 422  # kept open after a 401


def test_http_basic_is_accepted_but_never_offered(api_only: Appliance) -> None:
    """A browser offered Basic would keep the key and send it with another site's form posts
    (a text/plain body that needs no preflight): the 401 offers Bearer only."""
    import httpx

    form = b'{"model": "x", "messages": [], "p": "="}\r\n'  # what enctype=text/plain sends
    for path in ("/v1/chat/completions", "/v1/llm/model-endpoints"):
        reply = httpx.post(
            api_only.url + path,
            content=form,
            headers={"content-type": "text/plain", "origin": "https://elsewhere.example"},
        )
        assert reply.status_code == 401, reply.text
        offered = reply.headers["www-authenticate"]
        assert offered.startswith("Bearer") and "basic" not in offered.lower(), offered
    listed = httpx.get(api_only.url + "/v1/llm/model-endpoints", auth=(ADMIN_KEY, ""))
    assert listed.status_code == 200, listed.text  # as LLM Engine's client sends it


def test_the_favicon_needs_no_key(api_only: Appliance) -> None:
    import httpx

    reply = httpx.get(api_only.url + "/favicon.ico", follow_redirects=True)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("image/")
    page = httpx.get(api_only.url + "/ui/sign-in")
    assert 'rel="icon"' in page.text, page.status_code
    assert os.path.basename(str(reply.url.path)).startswith("favicon")


def test_a_json_body_sent_as_a_form_is_told_to_send_json(api_only: Appliance) -> None:
    sent = json.dumps(body("f")).encode()  # what `curl -d` sends, without a JSON content type
    reply = api_only.client().post(
        "/v1/llm/model-endpoints",
        content=sent,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 400 and "Content-Type: application/json" in reply.text
    made = api_only.client().post("/v1/llm/model-endpoints", content=sent)  # no content type
    assert made.status_code == 400 and "Content-Type: application/json" in made.text


HEAD_BOUND = 64 * 1024  # `Settings.max_head_bytes`'s default


@pytest.fixture(params=["true", "false"], ids=["lane", "no lane"])
def lane_or_not(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Appliance]:
    """The api alone with the fast lane on, then off: heads are read by the lane and by
    uvicorn's protocol it hands over to, or by uvicorn's protocol alone."""
    redis = RedisServer(tmp_path / "redis").start()
    appliance = Appliance(
        tmp_path / "api", redis, env_extra={"APPLIANCE_FAST_LANE": request.param}
    ).start(roles=("api",))
    yield appliance
    print(appliance.logs())
    appliance.stop()
    redis.stop()


def head_of(size: int, path: str = "/healthz") -> bytes:
    """A GET head of exactly `size` bytes, blank line included, padded by one header."""
    start = f"GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN_KEY}\r\nx-pad: "
    return (start + "a" * (size - len(start) - 4) + "\r\n\r\n").encode()


def send_head(port: int, head: bytes) -> tuple[int, bytes, Raw]:
    """Send `head` in pieces until the server answers; its status and body, and the
    connection."""
    conn = Raw(port)
    for at in range(0, len(head), 65536):
        if select.select([conn.sock], [], [], 0)[0]:
            break  # answered before the head was all sent
        try:
            conn.sock.sendall(head[at : at + 65536])
        except OSError:
            break  # hung up: read what it answered
    status, reply = conn.answer()
    return status, reply, conn


def closed(conn: Raw) -> bool:
    try:
        return conn.buf == b"" and conn.sock.recv(1) == b""
    except ConnectionError:
        return True


def test_a_head_over_the_bound_is_431_and_the_connection_closed(lane_or_not: Appliance) -> None:
    """A 1 MiB header is answered 431 at once (not after the header timeout) and its
    connection closed; heads up to the bound, and the next request, are served as usual."""
    port = lane_or_not.port
    began = time.monotonic()
    status, reply, conn = send_head(port, head_of(1024 * 1024))
    took = time.monotonic() - began
    assert status == 431, (status, reply[:300])
    assert str(HEAD_BOUND) in json.loads(reply)["detail"], reply
    assert closed(conn)
    assert took < 5, f"answered after {took:.1f} s"  # the header timeout is 10 s
    for size in (HEAD_BOUND, 20_000, 500):  # at the bound, over the lane's own 16 KiB, small
        status, reply, conn = send_head(port, head_of(size))
        assert status == 200, (size, status, reply[:300])
        assert conn.ask("GET", "/v1/llm/model-endpoints") == 200, size  # kept open
    status, _, conn = send_head(port, head_of(HEAD_BOUND + 1))
    assert status == 431 and closed(conn)
    conn = Raw(port)
    assert conn.ask("GET", "/v1/llm/model-endpoints") == 200  # served as before
    assert conn.ask("GET", "/v1/llm/model-endpoints") == 200


def test_huge_heads_leave_memory_as_it_was(lane_or_not: Appliance) -> None:
    """Three parallel 40 MiB headers: each is answered 431 and the api's peak memory grows by
    well under one of them (it read at most one read past the bound of each)."""
    pid = lane_or_not.procs["api"].pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = peak_rss_bytes(pid)
    statuses: list[int] = []
    huge = head_of(40 * 1024 * 1024)
    threads = [
        threading.Thread(target=lambda: statuses.append(send_head(lane_or_not.port, huge)[0]))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    grown = peak_rss_bytes(pid) - before
    print(f"peak memory grew by {grown / 2**20:.1f} MiB over 3 heads of 40 MiB")
    assert statuses == [431, 431, 431]
    assert grown < 16 * 2**20


@pytest.fixture
def many_model_files(tmp_path: Path) -> Iterator[Appliance]:
    """The api alone over a models directory of 3,000 entries (each listing walks them all),
    each key allowed 4 management requests at once."""
    models = tmp_path / "models"
    models.mkdir()
    for i in range(3000):
        (models / f"m{i:04}.gguf").write_bytes(b"GGUF")
    redis = RedisServer(tmp_path / "redis").start()
    env = {"APPLIANCE_MODELS_DIR": str(models), "APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS": "4"}
    appliance = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    yield appliance
    print(appliance.logs())
    appliance.stop()
    redis.stop()


def test_one_keys_flood_of_slow_reads_leaves_other_teams_writes_alone(
    many_model_files: Appliance,
) -> None:
    """One team's 300 GETs at once of the model files' listing held SQLite's write lock and the
    api's connections: another team's create waited 2 minutes or was a 503, and the builder's
    and worker's writes failed "database is locked". A key now has at most its management
    requests in flight (one more is a 429 with Retry-After naming the setting), and its reads
    take no write lock: the other team's create and update succeed, and nothing is a 5xx."""
    import concurrent.futures

    import httpx

    flooder, other = make_key(many_model_files, "red"), make_key(many_model_files, "blue")
    flood = httpx.Client(
        base_url=many_model_files.url,
        headers={"authorization": f"Bearer {flooder}"},
        timeout=120,
        limits=SHARED_POOL,
    )
    replies: list[httpx.Response] = []

    def read() -> None:
        replies.append(flood.get("/v1/storage/model-files"))

    with (
        concurrent.futures.ThreadPoolExecutor(max_workers=100) as pool,
        httpx.Client(
            base_url=many_model_files.url, headers={"authorization": f"Bearer {other}"}, timeout=120
        ) as client,
    ):
        reads = [pool.submit(read) for _ in range(300)]
        made = client.post("/v1/llm/model-endpoints", json=body("blue-one"))
        mark_ready(many_model_files)  # the builder's write, in the middle of the flood
        edited = client.put("/v1/llm/model-endpoints/blue-one", json={"max_workers": 2})
        for read_done in reads:
            read_done.result()
    flood.close()
    assert made.status_code == 200, made.text
    assert edited.status_code == 200, edited.text
    statuses = sorted({r.status_code for r in replies})
    assert statuses == [200, 429], statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert "APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS" in refused.json()["detail"]


@pytest.fixture
def one_request_a_key(tmp_path: Path) -> Iterator[Appliance]:
    """The api alone, each key allowed one management request at once."""
    redis = RedisServer(tmp_path / "redis").start()
    env = {"APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS": "1"}
    appliance = Appliance(tmp_path / "api", redis, env_extra=env).start(roles=("api",))
    yield appliance
    print(appliance.logs())
    appliance.stop()
    redis.stop()


def test_a_signed_in_browser_counts_against_its_keys_management_requests(
    one_request_a_key: Appliance,
) -> None:
    """The web UI's pages are management requests of the key signed in: they bypassed the
    per-key bound (a browser session could hold the api's threads and connections with no
    limit). While one of the session's pages is in flight (a followed log), another page of
    that session and a REST request with its key are a 429 naming the setting. The UI's static
    files (a page loads several at once) and a browser with no session are not counted."""
    import httpx

    from tests.forwarder.test_async_support import seed_endpoint
    from tests.harness import wait_until
    from tests.web.test_forms_and_sign_in import csrf_of

    appliance = one_request_a_key
    endpoint_id = seed_endpoint(appliance.data_dir, "red-one", "127.0.0.1:9", owner="red")
    key = make_key(appliance, "red")
    with (
        httpx.Client(base_url=appliance.url, timeout=30) as browser,
        appliance.client(key) as rest,
    ):
        csrf = csrf_of(browser.get("/ui/sign-in").text)
        signed = browser.post("/ui/sign-in", data={"csrf": csrf, "key": key, "next": "/ui"})
        assert signed.status_code == 303, signed.text
        with browser.stream(
            "GET", f"/ui/endpoints/{endpoint_id}/logs", params={"follow": "1"}
        ) as following:
            assert following.status_code == 200
            for page in (browser.get("/ui/endpoints"), rest.get("/v1/model-endpoints")):
                assert page.status_code == 429, page.text
                assert page.headers["retry-after"] == "1"
                assert "APPLIANCE_KEY_MAX_MANAGEMENT_REQUESTS" in page.text, page.text
            assert browser.get("/ui/static/app.css").status_code == 200
            with httpx.Client(base_url=appliance.url, timeout=30) as anonymous:
                assert anonymous.get("/ui/sign-in").status_code == 200
            other = appliance.client().get("/v1/model-endpoints")
            assert other.status_code == 200, other.text  # other key
        wait_until(
            lambda: browser.get("/ui/endpoints").status_code == 200, 10, "the slot given back"
        )
        assert rest.get("/v1/model-endpoints").status_code == 200


# vLLM reads a model or tokenizer named by an object-storage URL from that storage itself, from
# inside the replica (its Run:ai streamer, with the box's cloud credentials, which it asks the
# cloud's metadata service for): a host the operator never chose
OBJECT_STORAGE_CASES = [
    ({"tokenizer": "s3://bucket/tokenizer"}, "tokenizer"),
    ({"tokenizer": "GS://bucket/tokenizer"}, "tokenizer"),
    ({"tokenizer": "az://container/tokenizer"}, "tokenizer"),
    ({"extra_flags": {"--speculative-config": '{"model": "s3://bucket/draft"}'}}, "extra_flags"),
    (
        {"extra_flags": {"--speculative-config": '{"draft": {"tokenizer": ["gs://b/t"]}}'}},
        "extra_flags",
    ),
]


def test_a_model_or_tokenizer_in_object_storage_is_refused_naming_its_field(
    api_only: Appliance,
) -> None:
    team = api_only.client(make_key(api_only, "red"))
    for change, field in OBJECT_STORAGE_CASES:
        for path in ("/v1/llm/model-endpoints", "/v1/model-endpoints"):
            reply = team.post(path, json=body("s", **change))
            assert reply.status_code == 400, (change, path, reply.text)
            said = reply.json()["detail"]
            assert field in said and "object storage" in said, (change, said)
    assert (
        team.post("/v1/llm/model-endpoints", json=body("s", tokenizer="acme/tok")).status_code
        == 200
    )
    mark_ready(api_only)
    for change, field in OBJECT_STORAGE_CASES:
        reply = team.put("/v1/llm/model-endpoints/s", json=change)
        assert reply.status_code == 400 and field in reply.text, (change, reply.text)
