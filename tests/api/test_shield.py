"""The api's outermost middleware (`api/shield.py`), driven as uvicorn drives it: an error no
handler answered becomes a 500 in the route's envelope (a database still locked a 503 to
retry) and is not raised on (uvicorn would drop the keep-alive connection), and a chunked body
is cut off with a 413 as soon as it passes its route's limit, whatever the route makes of it."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import pytest
import sqlalchemy.exc

from api.shield import MANAGEMENT_BODY_BYTES, Shield

Message = dict[str, Any]


def run(
    app: Any, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]]
) -> list[Message]:
    sent: list[Message] = []
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
               for i, c in enumerate(chunks)]  # fmt: skip

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(Shield(app, frozenset({"/v1/chat/completions"}), 1000)(scope, receive, send))
    return sent


async def broken(scope: Any, receive: Any, send: Any) -> None:
    raise OverflowError("Python int too large to convert to SQLite INTEGER")


async def reads_all(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 400, "headers": []})
    await send({"type": "http.response.body", "body": b"the route's own answer"})


@pytest.mark.parametrize(
    ("path", "shape"), [("/v1/llm/model-endpoints", "detail"), ("/v1/chat/completions", "error")]
)
def test_an_unanswered_error_is_a_500_in_the_routes_envelope(path: str, shape: str) -> None:
    sent = run(broken, path, [b"{}"], [])
    assert sent[0]["status"] == 500
    assert shape in json.loads(sent[1]["body"])
    assert "SQLite" not in sent[1]["body"].decode()  # the cause is logged, not told


async def locked(scope: Any, receive: Any, send: Any) -> None:
    raise sqlite3.OperationalError("database is locked")


def test_a_database_still_locked_after_the_busy_timeout_is_a_503_to_retry() -> None:
    for path, shape in (("/v1/batches", "error"), ("/v1/llm/model-endpoints", "detail")):
        sent = run(locked, path, [b"{}"], [])
        assert sent[0]["status"] == 503, sent
        assert (b"retry-after", b"2") in sent[0]["headers"]
        assert "busy" in json.dumps(json.loads(sent[1]["body"])[shape])


async def pool_spent(scope: Any, receive: Any, send: Any) -> None:
    raise sqlalchemy.exc.TimeoutError(
        "QueuePool limit of size 5 overflow 10 reached, connection timed out, timeout 30.00"
    )


def test_a_database_busy_past_its_waits_is_a_503_to_retry_and_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One team's 100 GETs at once held every connection of the api's pool and SQLite's write
    lock: the others' requests waited 30 s for a connection and were 500s, each logging a
    traceback (900 in a minute). Like a lock still held after its busy timeout, a pool with no
    connection free in time is a 503 to retry, and each is a line of the log, no traceback."""
    for route in (locked, pool_spent):
        caplog.clear()
        with caplog.at_level("WARNING", logger="api.shield"):
            sent = run(route, "/v1/llm/model-endpoints", [b"{}"], [])
        assert sent[0]["status"] == 503, sent
        assert (b"retry-after", b"2") in sent[0]["headers"]
        assert "busy" in json.loads(sent[1]["body"])["detail"]
        assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.records
        assert caplog.records[0].exc_info is None and "busy" in caplog.records[0].getMessage()


def test_a_chunked_body_over_the_limit_is_413_once_it_passes_it() -> None:
    piece = b"x" * (MANAGEMENT_BODY_BYTES // 4)
    sent = run(reads_all, "/v1/api-keys", [piece] * 8, [])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    small = run(reads_all, "/v1/api-keys", [b"{}"], [])
    assert small[0]["status"] == 400  # under the limit: the route answers as it would


def test_a_declared_length_over_the_limit_is_413_unread() -> None:
    big = str(MANAGEMENT_BODY_BYTES + 1).encode()
    sent = run(broken, "/v1/config/apply", [b""], [(b"content-length", big)])
    assert sent[0]["status"] == 413
    inference = run(reads_all, "/v1/chat/completions", [b""], [(b"content-length", b"1001")])
    assert inference[0]["status"] == 413  # its own, configured limit
    said = json.loads(inference[1]["body"])["error"]["message"]
    assert "1000 bytes" in said and "APPLIANCE_MAX_BODY_BYTES" in said, said  # what to change
    assert run(broken, "/v1/api-keys", [b""], [(b"content-length", b"-1")])[0]["status"] == 400


async def reads_a_form(scope: Any, receive: Any, send: Any) -> None:
    """A UI form route: reads its body with Starlette, which raises when the client left."""
    from starlette.requests import Request

    await Request(scope, receive).form()
    await send({"type": "http.response.start", "status": 303, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_a_client_that_leaves_mid_body_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    """Anyone may post the sign-in form and hang up half way: nothing is logged as an error
    (a traceback a request) and nothing is answered to a connection that is gone."""
    sent: list[Message] = []
    pending = [{"type": "http.request", "body": b"csrf=x", "more_body": True}]

    async def receive() -> Message:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    form = [(b"content-type", b"application/x-www-form-urlencoded")]
    scope = {"type": "http", "method": "POST", "path": "/ui/sign-in", "headers": form}
    with caplog.at_level("ERROR", logger="api.shield"):
        asyncio.run(Shield(reads_a_form, frozenset(), 1000)(scope, receive, send))
    assert caplog.records == [] and sent == []
    whole = run(reads_a_form, "/ui/sign-in", [b"csrf=x", b"&key=y"], form)
    assert whole[0]["status"] == 303  # the whole body came: answered as ever


def test_the_budget_of_bodies_in_flight_holds_by_key_and_gives_all_back() -> None:
    """The one rule both transports and this middleware count bodies by (`api/bodies.py`): a
    body of 64 KiB or less holds nothing; a key holds at most a quarter (429), all keys the
    whole (503, Retry-After); a refusal holds nothing, and every body given back leaves zero."""
    from api.bodies import SMALL_BODY_BYTES, BodyBudget, Reading
    from appliance.errors import CapacityError, RateLimitedError

    budget = BodyBudget(4_000_000)
    assert Reading(budget, "a").upto(SMALL_BODY_BYTES) is None and budget.held == 0
    held = [Reading(budget, key) for key in "abcd"]
    for reading in held:
        assert reading.upto(600_000) is None
        assert reading.upto(1_000_000) is None  # a chunked body, as it comes
    assert isinstance(held[0].upto(1_000_001), RateLimitedError)
    refused = Reading(budget, "e").upto(100_000)
    assert isinstance(refused, CapacityError) and refused.retry_after_s == 1
    assert budget.held == 4_000_000
    for reading in held:
        reading.done()
        reading.done()  # once only
    assert budget.held == 0 and budget.by_key == {}


async def disk_full(scope: Any, receive: Any, send: Any) -> None:
    raise sqlite3.OperationalError("database or disk is full")


def test_a_database_on_a_full_disk_is_a_507_saying_so() -> None:
    """A change (a key made or revoked, an endpoint created, an upload's audit entry) on a
    disk with no byte left was a 500 "internal error": it is the 507 an upload past the
    reserve gets, saying what frees room."""
    for path, shape in (("/v1/batches", "error"), ("/v1/api-keys", "detail")):
        sent = run(disk_full, path, [b"{}"], [])
        assert sent[0]["status"] == 507, sent
        said = json.loads(sent[1]["body"])[shape]
        said = said["message"] if shape == "error" else said
        assert said == (
            "the disk holding the appliance's database is full; free some space (delete unused "
            "files and models) and retry"
        )
