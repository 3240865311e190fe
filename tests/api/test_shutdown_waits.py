"""The api's stop and the calls still waiting (for their key, their count, a replica):
`Core.shut_down` ends every one of them, however many cancels a wait drops."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from api.inference.call import Core
from forwarder.proxy import Forwarder, Limits


def core() -> Core:
    """A Core with what it reads at its making; its calls' waits are added by the test."""
    settings = SimpleNamespace(
        activation_timeout_s=1.0,
        stream_keepalive_s=1.0,
        max_body_bytes=1024,
        max_body_bytes_in_flight=1024,
        cors_origins=[],
    )
    keys = SimpleNamespace(counted_as=lambda key: key)
    state: Any = SimpleNamespace(
        settings=settings, key_cache=keys, forwarder=Forwarder(limits=Limits()), limiter=None
    )
    return Core(state)


def test_a_wait_that_drops_the_stops_cancel_is_cancelled_again() -> None:
    """At the api's stop each call still waiting is cancelled, and so answers 503 "the
    appliance is shutting down". A wait can drop that cancel (redis-py's can; Python 3.11's
    `asyncio.wait_for` did when it was woken as it was cancelled) and wait on: it is cancelled
    again until it ends, where it was cancelled once and its client's connection was cut when
    the api stopped."""

    async def main() -> None:
        waits = core()
        cancels = 0

        async def stubborn() -> None:  # drops the first cancel, as such a wait does
            nonlocal cancels
            while True:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancels += 1
                    if cancels > 1:
                        raise

        hold = asyncio.ensure_future(stubborn())
        waits.holds.add(hold)
        hold.add_done_callback(waits.holds.discard)
        await asyncio.sleep(0.05)
        stopping = waits.shut_down()
        await asyncio.wait_for(stopping, timeout=5)  # type: ignore[arg-type]
        assert hold.cancelled() and cancels == 2
        assert waits.stopping and not waits.holds

    asyncio.run(main())


def test_a_wait_that_never_ends_does_not_hold_the_stop_up() -> None:
    """One that drops every cancel is given up after RECANCEL_FOR_S: the api still stops."""

    async def main() -> None:
        waits = core()
        deaf = True

        async def wait() -> None:
            while True:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    if not deaf:
                        raise

        hold = asyncio.ensure_future(wait())
        waits.holds.add(hold)
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(waits.shut_down(), timeout=30)
        assert loop.time() - began < 10
        assert not hold.done()  # outlived the stop, which went on without it
        deaf = False
        hold.cancel()

    asyncio.run(main())
