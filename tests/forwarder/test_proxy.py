"""The data plane (`Forwarder` and its relay) against real loopback HTTP servers, through
`Forwarder.fetch` as the worker uses it: least outstanding choice, retries on connection
failures, ejection until healthy, the per-replica cap, cold-start holds, timeouts and dropping
an abandoned request."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from appliance.errors import CapacityError, EndpointDownError, NoReadyReplicaError, UpstreamError
from forwarder.proxy import Forwarder, Limits
from forwarder.table import RoutingTable, Target, TargetReplica


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Replica:
    """A tiny upstream: POST answers after `delay_s`; /health answers `healthy`."""

    def __init__(self, name: str, delay_s: float = 0.0) -> None:
        self.name = name
        self.delay_s = delay_s
        self.healthy = True
        self.served = 0
        self.cancelled = 0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def post(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.served += 1
        return web.json_response(
            {"replica": self.name, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Replica]:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.post)
        app.router.add_get("/health", self.health)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        try:
            yield self
        finally:
            await runner.cleanup()


def route(
    *replicas: tuple[str, str], cap: int | None = None, status: str = "READY", reason: str = ""
) -> Target:
    return Target(
        endpoint_id="end_1",
        name="m",
        owner="t",
        public=False,
        framework="vllm",
        endpoint_type="streaming",
        status=status,
        replicas=tuple(TargetReplica(rid, url) for rid, url in replicas),
        max_concurrency=cap,
        status_reason=reason,
    )


def table(r: Target) -> RoutingTable:
    return RoutingTable({r.name: r}, {r.endpoint_id: r})


async def with_forwarder(
    r: Target, body: Callable[[Forwarder], Awaitable[None]], **limits: float
) -> None:
    fwd = Forwarder(limits=Limits(**limits))  # type: ignore[arg-type]
    fwd.update(table(r))
    await fwd.start()
    try:
        await body(fwd)
    finally:
        await fwd.close()


async def fetch(
    fwd: Forwarder, r: Target, hold_s: float = 0.0, timeout_s: float = 0.0
) -> tuple[int, bytes]:
    """A chat request as the worker sends one: a replica from `acquire`, then `fetch`."""
    started = time.perf_counter()
    current, replica, waited = await fwd.acquire(r, hold_s)
    return await fwd.fetch(
        current, replica, "/v1/chat/completions", b"{}", started=started, waited=waited,
        timeout_s=timeout_s,
    )  # fmt: skip


async def call(fwd: Forwarder, r: Target, hold_s: float = 0.0) -> tuple[str, int]:
    """Which replica answered, and its status."""
    status, body = await fetch(fwd, r, hold_s)
    return json.loads(body)["replica"], status


def test_least_outstanding_replica_is_chosen() -> None:
    async def main() -> None:
        slow, fast = Replica("slow", delay_s=0.5), Replica("fast")
        async with slow.running(), fast.running():
            r = route(("slow", slow.url), ("fast", fast.url))

            async def body(fwd: Forwarder) -> None:
                first = asyncio.ensure_future(call(fwd, r))
                await asyncio.sleep(0.05)
                assert fwd.inflight == {"slow": 1} or fwd.inflight == {"fast": 1}
                busy = next(iter(fwd.inflight))
                picks = [(await call(fwd, r))[0] for _ in range(3)]
                assert busy not in picks  # the busy one is never least outstanding
                await first
                assert fwd.inflight == {}

            await with_forwarder(r, body)

    asyncio.run(main())


def test_connection_failure_retries_on_another_replica_then_ejects_it() -> None:
    async def main() -> None:
        good = Replica("good")
        async with good.running():
            r = route(("dead", f"http://127.0.0.1:{free_port()}"), ("good", good.url))

            async def body(fwd: Forwarder) -> None:
                fwd.inflight["good"] = 1  # make the dead one least outstanding
                for _ in range(3):
                    assert await call(fwd, r) == ("good", 200)
                    fwd.inflight["good"] = 1
                assert "dead" in fwd.ejected
                assert await call(fwd, r) == ("good", 200)
                assert good.served == 4

            await with_forwarder(r, body)

    asyncio.run(main())


def test_ejected_replica_returns_when_healthy() -> None:
    async def main() -> None:
        flaky = Replica("flaky")
        async with flaky.running():
            r = route(("flaky", flaky.url))

            async def body(fwd: Forwarder) -> None:
                flaky.healthy = False
                for _ in range(3):
                    fwd.failed(r, "flaky")
                assert fwd.ejected == {"flaky"}
                with pytest.raises(NoReadyReplicaError):
                    await call(fwd, r, hold_s=0.2)
                flaky.healthy = True
                assert await call(fwd, r, hold_s=5) == ("flaky", 200)
                assert fwd.ejected == set()

            await with_forwarder(r, body)

    asyncio.run(main())


def test_an_ejected_replica_that_moved_returns_at_its_new_address() -> None:
    """A replica restarted on another port (`docker restart` with ports published on the
    host) was probed at the address it had when it failed, which never answers again: it
    stayed out of rotation after the builder routed it to its new one."""

    async def main() -> None:
        moved = Replica("moved")
        async with moved.running():
            before = route(("moved", f"http://127.0.0.1:{free_port()}"))

            async def body(fwd: Forwarder) -> None:
                for _ in range(3):
                    fwd.failed(before, "moved")
                assert fwd.ejected == {"moved"}
                now = route(("moved", moved.url))  # the builder's new address, routed
                fwd.update(table(now))
                assert await call(fwd, now, hold_s=5) == ("moved", 200)
                assert fwd.ejected == set()

            await with_forwarder(before, body)

    asyncio.run(main())


def test_a_wait_that_ends_says_why_only_to_the_endpoints_team() -> None:
    """The builder's reason (a replica's last log line while it starts) is its owner's, as
    the reasons of a failure are (`table.check_coming`): another team calling a public
    endpoint is told only that no replica is ready yet."""
    reason = "starting 1 replica (95 s): token=hunter2"
    r = route(status="UPDATE_IN_PROGRESS", reason=reason)

    async def body(fwd: Forwarder) -> None:
        with pytest.raises(NoReadyReplicaError) as owner:
            await fwd.acquire(r, 0.2)
        assert reason in owner.value.message
        with pytest.raises(NoReadyReplicaError) as other:
            await fwd.acquire(r, 0.2, False)
        assert "hunter2" not in other.value.message and "no ready replica" in other.value.message

    asyncio.run(with_forwarder(r, body))


def test_cap_waits_briefly_then_answers_503() -> None:
    async def main() -> None:
        slow = Replica("one", delay_s=0.4)
        async with slow.running():
            r = route(("one", slow.url), cap=1)

            async def body(fwd: Forwarder) -> None:
                first = asyncio.ensure_future(call(fwd, r))
                await asyncio.sleep(0.05)
                assert await call(fwd, r) == ("one", 200)  # waited for the slot
                await first
                blocker = asyncio.ensure_future(call(fwd, r))
                await asyncio.sleep(0.05)
                with pytest.raises(CapacityError):
                    fwd.limits = Limits(queue_wait_s=0.1)
                    await call(fwd, r)
                await blocker

            await with_forwarder(r, body, queue_wait_s=2.0)

    asyncio.run(main())


def test_a_hold_ends_when_the_endpoint_fails_to_start() -> None:
    async def main() -> None:
        first = route(status="UPDATE_IN_PROGRESS")

        async def body(fwd: Forwarder) -> None:
            waiting = asyncio.ensure_future(call(fwd, first, hold_s=60))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # a first deploy is worth waiting for
            began = time.monotonic()
            fwd.update(table(route(status="UPDATE_FAILED", reason="pull failed\nlog tail")))
            with pytest.raises(EndpointDownError, match="failed to start: pull failed; fix it"):
                await waiting
            assert time.monotonic() - began < 30  # at the table's change, not the hold's end
            with pytest.raises(EndpointDownError, match="is being deleted"):
                fwd.update(table(route(status="DELETE_IN_PROGRESS")))
                await call(fwd, first, hold_s=60)
            with pytest.raises(EndpointDownError, match="was deleted"):
                fwd.update(RoutingTable.empty())
                await call(fwd, first, hold_s=60)

        await with_forwarder(first, body)

    asyncio.run(main())


def test_a_failed_endpoint_with_ready_replicas_is_served() -> None:
    async def main() -> None:
        old = Replica("old")
        async with old.running():
            # a rolling update that failed keeps the old generation serving
            failed = route(("old", old.url), status="UPDATE_FAILED", reason="pull failed")

            async def body(fwd: Forwarder) -> None:
                assert await call(fwd, failed, hold_s=1) == ("old", 200)

            await with_forwarder(failed, body)

    asyncio.run(main())


def test_cold_endpoint_is_held_until_a_replica_is_ready() -> None:
    async def main() -> None:
        late = Replica("late")
        async with late.running():
            cold = route()
            demanded: list[str] = []

            async def body(fwd: Forwarder) -> None:
                fwd.on_demand = lambda r: demanded.append(r.name)
                waiting = asyncio.ensure_future(call(fwd, cold, hold_s=5))
                await asyncio.sleep(0.3)
                assert not waiting.done() and demanded == ["m"]
                fwd.update(table(route(("late", late.url))))
                assert await waiting == ("late", 200)
                with pytest.raises(NoReadyReplicaError):
                    fwd.update(table(cold))
                    await call(fwd, cold, hold_s=0.1)

            await with_forwarder(cold, body)

    asyncio.run(main())


def test_a_wait_cancelled_as_it_is_woken_ends_cancelled() -> None:
    """A request waiting for a replica (a cold start) or for a slot (every replica at its cap)
    that is cancelled (the api stops, the client goes) just as its wait is woken (a new
    routing table, a slot freed elsewhere) ends cancelled: Python 3.11's `asyncio.wait_for`
    dropped such a cancel, and the request waited on, the api's 503 at its stop never sent."""

    async def main() -> None:
        slow = Replica("one", delay_s=1.0)
        async with slow.running():
            cold, capped = route(), route(("one", slow.url), cap=1)

            async def woken(fwd: Forwarder, r: Target, wake: Callable[[], None]) -> None:
                waiting = asyncio.ensure_future(fwd.acquire(r, hold_s=30))
                await asyncio.sleep(0.1)
                assert not waiting.done()
                wake()  # and the cancel in the same step, before the wait resumes
                waiting.cancel()
                await asyncio.wait([waiting], timeout=2)
                assert waiting.cancelled(), "the cancel was lost: the request waits on"

            async def body(fwd: Forwarder) -> None:
                await woken(fwd, cold, lambda: fwd.update(table(cold)))
                fwd.update(table(capped))
                first = asyncio.ensure_future(call(fwd, capped))
                await asyncio.sleep(0.1)
                await woken(fwd, capped, fwd.slot_freed)
                assert await first == ("one", 200)

            await with_forwarder(cold, body, queue_wait_s=30.0)

    asyncio.run(main())


def test_silent_replica_is_a_504_and_abandoning_cancels_it() -> None:
    async def main() -> None:
        silent = Replica("silent", delay_s=3)
        async with silent.running():
            r = route(("silent", silent.url))

            async def body(fwd: Forwarder) -> None:
                with pytest.raises(UpstreamError) as caught:
                    await fetch(fwd, r, timeout_s=0.3)
                assert caught.value.status_code == 504
                assert fwd.inflight == {}
                task = asyncio.ensure_future(call(fwd, r))
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.sleep(0.2)
                assert silent.cancelled == 2  # the replica saw both requests go away
                assert fwd.inflight == {}

            await with_forwarder(r, body)

    asyncio.run(main())
