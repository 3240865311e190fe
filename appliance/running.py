"""Who runs on a data directory, told by locks in it: each role holds a shared lock on
`running.lock` while it runs, and the builder (one at a time) an exclusive one on
`builder.lock` too. `appliance restore` refuses a directory a running appliance uses (it
would empty it under them: their writes went to the deleted database), and a second builder
(a second `appliance up` on the same data) refuses to start. Called by appliance/cli.py when a
role starts, and by appliance/backup.py."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

RUNNING_LOCK = "running.lock"
BUILDER_LOCK = "builder.lock"


@dataclass
class Holding:
    """The locks one process holds; they last until it ends (or `release`)."""

    fds: list[int] = field(default_factory=list)

    def release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class AlreadyRunningError(Exception):
    """A builder already runs on this data directory."""


def _lock(path: Path, how: int) -> int | None:
    """The descriptor holding `path` locked `how`, or None when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def hold(data_dir: Path, role: str) -> Holding:
    """Mark `data_dir` in use by this process's role; raises AlreadyRunningError for a second
    builder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    holding = Holding()
    shared = _lock(data_dir / RUNNING_LOCK, fcntl.LOCK_SH)  # waits out a restore's look only
    if shared is not None:
        holding.fds.append(shared)
    if role == "builder":
        mine = _lock(data_dir / BUILDER_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if mine is None:
            holding.release()
            raise AlreadyRunningError(
                f"another builder runs on {data_dir} (a second `appliance up` on the same "
                "data?); one builder at a time: stop it first"
            )
        holding.fds.append(mine)
    return holding


def in_use(data_dir: Path) -> bool:
    """Whether a role of a running appliance holds `data_dir`."""
    path = data_dir / RUNNING_LOCK
    if not path.is_file():
        return False
    fd = _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return True
    os.close(fd)
    return False
