"""Chooses the GPUs for one replica: a pure policy over the inventory and this appliance's own
claims, called by the builder's planner before it creates a container.

Whole GPUs (a tensor-parallel group) go only to GPUs nobody uses; the best-linked set wins.
A fraction of one GPU (vLLM's `--gpu-memory-utilization`) packs onto the fullest GPU that still
has room. When nothing fits, `NoFreeGpuError` says which GPUs are taken and by whom.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from appliance.errors import InvalidSpecError, NoFreeGpuError
from gpu.inventory import Gpu, Inventory

# Claims are sums of floats such as 0.45 + 0.45; compare them with this much slack.
CLAIM_EPSILON = 1e-6
# Memory in use on a GPU that shows no process: from 1 GiB on, something outside the appliance
# holds it. A builder in a container often cannot see other containers' processes (the driver
# filters them by PID namespace) but always sees the memory; an idle GPU uses a few MiB.
FOREIGN_MEMORY_USED_BYTES = 1 << 30
# Beyond this many candidate sets, grow a set greedily from each GPU instead of trying all.
MAX_COMBINATIONS = 20_000

_GIB = float(1 << 30)


@dataclass(frozen=True)
class GpuRequest:
    """What one replica asks for: `count` whole GPUs, or a `memory_fraction` of one GPU."""

    count: int
    memory_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.count < 0:
            raise InvalidSpecError(f"gpus must be 0 or more, not {self.count}", field="gpus")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise InvalidSpecError(
                f"memory fraction must be in (0, 1], not {self.memory_fraction}",
                field="memory_fraction",
            )
        if self.is_fractional and self.count != 1:
            raise InvalidSpecError(
                f"a fraction of a GPU is for 1 GPU per replica, not {self.count}", field="gpus"
            )

    @property
    def is_fractional(self) -> bool:
        return self.memory_fraction < 1.0


def place(
    inventory: Inventory, claims: Mapping[int, float], request: GpuRequest
) -> tuple[int, ...]:
    """The GPU indices for one replica, ascending; raises NoFreeGpuError saying what is missing.

    `claims` maps a GPU index to the fraction of it this appliance's replicas hold already
    (1.0 for a whole GPU). Deterministic: the same arguments give the same GPUs.
    """
    if request.count == 0:
        return ()
    if request.is_fractional:
        return (_place_fraction(inventory, claims, request.memory_fraction),)
    free = [
        gpu.index
        for gpu in inventory.gpus
        if _claim(claims, gpu) <= CLAIM_EPSILON and not _is_foreign(gpu)
    ]
    if len(free) < request.count:
        raise NoFreeGpuError(_shortage(inventory, claims, request.count, len(free)))
    return _best_linked(inventory, free, request.count)


def _place_fraction(inventory: Inventory, claims: Mapping[int, float], fraction: float) -> int:
    """Best fit: the most-claimed GPU that still has room for `fraction`, lowest index on ties."""
    fits = [
        gpu
        for gpu in inventory.gpus
        if _claim(claims, gpu) + fraction <= 1.0 + CLAIM_EPSILON
        and (_claim(claims, gpu) > CLAIM_EPSILON or not _is_foreign(gpu))
    ]
    if not fits:
        raise NoFreeGpuError(
            f"needs {fraction:g} of a GPU, none has room ({_why_taken(inventory, claims)})"
        )
    return min(fits, key=lambda gpu: (-_claim(claims, gpu), gpu.index)).index


def _best_linked(inventory: Inventory, free: Sequence[int], count: int) -> tuple[int, ...]:
    """The set of `count` GPUs from `free` with the best links.

    Ranked by the worst link within the set (so all-NVLink sets come first), then the sum of
    link levels, then the lowest indices.
    """
    levels = {(a, b): int(inventory.link(a, b)) for a in free for b in free if a != b}
    if math.comb(len(free), count) <= MAX_COMBINATIONS:
        candidates: Iterable[tuple[int, ...]] = itertools.combinations(sorted(free), count)
    else:
        candidates = (_grow(levels, free, count, seed) for seed in free)
    return min(candidates, key=lambda chosen: (*_score(levels, chosen), chosen))


def _score(levels: Mapping[tuple[int, int], int], chosen: Sequence[int]) -> tuple[int, int]:
    """The worst and the sum of the link levels between the GPUs in `chosen`."""
    pairs = [levels[pair] for pair in itertools.combinations(chosen, 2)]
    return max(pairs, default=0), sum(pairs)


def _grow(
    levels: Mapping[tuple[int, int], int], free: Sequence[int], count: int, seed: int
) -> tuple[int, ...]:
    """A set of `count` GPUs grown from `seed`, each time adding the best-linked free GPU."""
    chosen = [seed]
    while len(chosen) < count:
        rest = [index for index in free if index not in chosen]
        chosen.append(min(rest, key=lambda index: (*_score(levels, [*chosen, index]), index)))
    return tuple(sorted(chosen))


def _claim(claims: Mapping[int, float], gpu: Gpu) -> float:
    return claims.get(gpu.index, 0.0)


def _is_foreign(gpu: Gpu) -> bool:
    """Whether something outside the appliance uses this GPU (asked only of unclaimed GPUs)."""
    return bool(gpu.processes) or gpu.memory_used_bytes >= FOREIGN_MEMORY_USED_BYTES


def _shortage(inventory: Inventory, claims: Mapping[int, float], count: int, free: int) -> str:
    if count > len(inventory.gpus):
        about = inventory.message or _why_taken(inventory, claims)
        return f"needs {_gpus(count)}, the inventory has {len(inventory.gpus)} ({about})"
    return f"needs {_gpus(count)}, {free} free ({_why_taken(inventory, claims)})"


def _why_taken(inventory: Inventory, claims: Mapping[int, float]) -> str:
    """Why the GPUs that are not free are taken, for the error message."""
    if not inventory.gpus:
        return inventory.message or "the inventory has no GPUs"
    full = [gpu.index for gpu in inventory.gpus if _claim(claims, gpu) >= 1.0 - CLAIM_EPSILON]
    reasons = [
        _foreign_reason(gpu)
        for gpu in inventory.gpus
        if _claim(claims, gpu) <= CLAIM_EPSILON and _is_foreign(gpu)
    ]
    reasons += [
        f"GPU {gpu.index} has {1.0 - _claim(claims, gpu):.2f} left"
        for gpu in inventory.gpus
        if CLAIM_EPSILON < _claim(claims, gpu) < 1.0 - CLAIM_EPSILON
    ]
    if full:
        reasons.append(f"{_indices(full)} claimed by other replicas")
    return "; ".join(reasons) or "no GPU is taken"


def _foreign_reason(gpu: Gpu) -> str:
    used = sum(process.used_memory_bytes for process in gpu.processes) or gpu.memory_used_bytes
    if not gpu.processes:
        return f"GPU {gpu.index} has {used / _GIB:.1f} GiB in use outside the appliance"
    pids = ",".join(str(process.pid) for process in gpu.processes)
    if len(gpu.processes) == 1:
        who = f"a process outside the appliance using {used / _GIB:.1f} GiB, pid {pids}"
    else:
        who = f"{len(gpu.processes)} processes outside the appliance using"
        who += f" {used / _GIB:.1f} GiB, pids {pids}"
    return f"GPU {gpu.index} held by {who}"


def _indices(indices: Sequence[int]) -> str:
    return ("GPU " if len(indices) == 1 else "GPUs ") + ",".join(map(str, indices))


def _gpus(count: int) -> str:
    return "1 GPU" if count == 1 else f"{count} GPUs"
