"""The rest of an admission that has to wait, as a task (`api/inference/call.Call.start`).

`Call.start` runs a call's admission coroutine by hand, outside any task. Before the first
thing that may wait (a key to verify, a limit to count in Redis, a replica to wait for; these
use libraries that want to run in a task), the coroutine awaits `in_task()`, which stops it
once; `resumed` then lets a task carry it on from there: it hands the task what the coroutine
waits on, then resumes the coroutine exactly as a task resumes the coroutine it runs, with
`send(None)`, or throws in what the task was thrown (its cancellation).
Not compiled: `__await__` is a plain generator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any


class _Rest:
    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, None]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                yield waiting
            except BaseException as exc:  # the task was cancelled while the coroutine waited
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                waiting = coro.send(None)
            except StopIteration:
                return


async def in_task() -> None:
    """Make sure what follows runs in a task: outside one, stop once (the driver then makes
    one, `Call.start`); inside one, nothing."""
    if asyncio.current_task() is None:
        await asyncio.sleep(0)  # a bare yield: needs no task


async def resumed(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Carry `coro` on from where it stopped, waiting on `waiting`."""
    await _Rest(coro, waiting)
