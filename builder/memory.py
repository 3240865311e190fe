"""The box's memory as a placed resource, beside the GPUs: how much the replicas' memory limits
may add up to, what one replica counts, and why an endpoint waits for memory. Pure; the planner
(`builder/reconcile.py`) calls it, the builder's loop (`builder/loop.py`) computes the budget.

Without it a replica with `gpus: 0` was placed with no check at all, so one team's CPU
endpoints could give their containers more memory than the box has, and the kernel's OOM killer
then chose whom to kill. Replicas with GPUs are bounded by their GPUs and are not counted: their
weights live on the GPUs, and their limit is a ceiling far above what they hold.

A replica holds its container's limit (the endpoint's `memory`) from
the moment its row is written until its container is removed: while it starts, serves, or
drains. Limits, not use, are counted: a limit is what the container may take at any moment.
"""

from __future__ import annotations

# Kept for the appliance's own processes, Redis, Docker and the OS: a share of the box's
# memory, at least a fixed amount (a small box needs it most), never more than half of it.
MEMORY_RESERVE_SHARE = 0.10
MEMORY_RESERVE_MIN_BYTES = 1 << 30

_GIB = float(1 << 30)


def for_replicas(total_bytes: int) -> int:
    """What the replicas' limits may add up to on a box with `total_bytes` of memory (Docker's
    MemTotal): all of it less the reserve, the larger of 10% and 1 GiB, at most half."""
    reserve = max(int(total_bytes * MEMORY_RESERVE_SHARE), MEMORY_RESERVE_MIN_BYTES)
    return max(total_bytes - min(reserve, total_bytes // 2), 0)


def counted(limit_bytes: int, budget_bytes: int) -> int:
    """What a replica with this limit counts against the budget: its limit, or the whole budget
    when the limit is more. The api lets an endpoint's memory be as much as the box has (a vLLM
    endpoint's default on a box under 64 GiB), so such a replica starts, but only alone."""
    return max(min(limit_bytes, budget_bytes), 0)


def gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def shortage(limit_bytes: int, budget_bytes: int, claimed_bytes: int) -> str:
    """`needs 4.0 GiB, 2.5 GiB of the box's 21.6 GiB are free` (what follows `waiting for
    memory: `)."""
    free = gib(max(budget_bytes - claimed_bytes, 0))
    if limit_bytes > budget_bytes:
        return (
            f"needs all of the box's {gib(budget_bytes)} (its limit is {gib(limit_bytes)}), "
            f"{free} are free; set the endpoint's `memory` to what it needs to start beside "
            "other replicas"
        )
    return f"needs {gib(limit_bytes)}, {free} of the box's {gib(budget_bytes)} are free"
