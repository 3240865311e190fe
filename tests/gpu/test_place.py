"""Tests for gpu.place: which GPUs a replica gets, and what the refusal says."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from appliance.errors import InvalidSpecError, NoFreeGpuError
from gpu.inventory import EMPTY, Gpu, GpuProcess, Inventory, Link, StaticGpuSource
from gpu.place import GpuRequest, place

GIB = 1 << 30
EIGHT_H100 = Path(__file__).with_name("eight_h100.json")


def _gpu(index: int, *, processes: tuple[GpuProcess, ...] = (), used_bytes: int = 0) -> Gpu:
    used = used_bytes or sum(p.used_memory_bytes for p in processes)
    return Gpu(
        index=index,
        uuid=f"GPU-test-{index}",
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=used,
        memory_free_bytes=80 * GIB - used,
        utilization_percent=0,
        processes=processes,
        pci_bus_id=f"00000000:{index + 0x10:02X}:00.0",
    )


def _box(
    count: int, link: Callable[[int, int], Link], busy: Mapping[int, Gpu] | None = None
) -> Inventory:
    gpus = tuple((busy or {}).get(i, _gpu(i)) for i in range(count))
    pairs = itertools.combinations(range(count), 2)
    return Inventory(gpus, {frozenset((a, b)): link(a, b) for a, b in pairs})


def _quads(a: int, b: int) -> Link:
    """NVLink pairs (0,1) (2,3) (4,5) (6,7); a quad of two pairs shares a NUMA node."""
    if a // 2 == b // 2:
        return Link.NVLINK
    return Link.NUMA_NODE if a // 4 == b // 4 else Link.SYSTEM


def _whole(claimed: list[int]) -> dict[int, float]:
    return dict.fromkeys(claimed, 1.0)


def test_count_zero_gets_no_gpus_even_without_gpus() -> None:
    assert place(EMPTY, {}, GpuRequest(0)) == ()


def test_tp2_takes_an_nvlink_pair_over_lower_free_unlinked_gpus() -> None:
    inventory = StaticGpuSource(EIGHT_H100).read()

    assert place(inventory, {}, GpuRequest(2)) == (0, 1)
    # 1 and 2 are free and lowest, but only SYSTEM-linked; 4 and 5 share NVLink.
    assert place(inventory, _whole([0, 3]), GpuRequest(2)) == (4, 5)


def test_tp4_takes_a_quad_of_two_nvlink_pairs_over_lower_indices() -> None:
    inventory = _box(8, _quads)

    assert place(inventory, _whole([1]), GpuRequest(4)) == (4, 5, 6, 7)
    assert place(inventory, {}, GpuRequest(4)) == (0, 1, 2, 3)


def test_tp2_without_a_free_nvlink_pair_takes_the_best_remaining_link() -> None:
    inventory = _box(8, _quads)

    # Free: 0, 2, 5, 7. No NVLink pair; (0,2) and (5,7) share a NUMA node, lowest wins.
    assert place(inventory, _whole([1, 3, 4, 6]), GpuRequest(2)) == (0, 2)


def test_equal_worst_links_are_settled_by_the_sum_of_links() -> None:
    pix = {frozenset((1, 3)), frozenset((2, 3))}
    inventory = _box(4, lambda a, b: Link.PCIE_SINGLE if {a, b} in pix else Link.PCIE_HOSTBRIDGE)

    # (0,1,2) is lowest, but (1,2,3) has two PIX links against PHB's worst all the same.
    assert place(inventory, {}, GpuRequest(3)) == (1, 2, 3)


def test_large_boxes_grow_sets_greedily_and_still_find_the_nvlink_group() -> None:
    # 24 GPUs in three all-NVLink groups of 8: too many sets to try them all.
    inventory = _box(24, lambda a, b: Link.NVLINK if a // 8 == b // 8 else Link.SYSTEM)

    assert place(inventory, _whole([0, 9]), GpuRequest(8)) == tuple(range(16, 24))


def test_a_foreign_process_excludes_its_gpu() -> None:
    squatter = _gpu(0, processes=(GpuProcess(pid=4242, used_memory_bytes=3 * GIB),))
    inventory = _box(2, lambda a, b: Link.NVLINK, busy={0: squatter})

    assert place(inventory, {}, GpuRequest(1)) == (1,)
    assert place(inventory, {}, GpuRequest(1, memory_fraction=0.5)) == (1,)


def test_the_refusal_names_foreign_processes_partial_and_whole_claims() -> None:
    squatter = _gpu(3, processes=(GpuProcess(pid=4242, used_memory_bytes=int(10.2 * GIB)),))
    inventory = _box(8, _quads, busy={3: squatter})
    claims = {**_whole([0, 1, 4, 5]), 2: 0.5}

    with pytest.raises(NoFreeGpuError) as caught:
        place(inventory, claims, GpuRequest(4))

    assert caught.value.message == (
        "needs 4 GPUs, 2 free (GPU 3 held by a process outside the appliance using 10.2 GiB,"
        " pid 4242; GPU 2 has 0.50 left; GPUs 0,1,4,5 claimed by other replicas)"
    )


def test_memory_in_use_without_a_visible_process_counts_as_foreign() -> None:
    # A builder in a container does not see other containers' processes, only their memory.
    hidden = _gpu(0, used_bytes=12 * GIB)
    inventory = _box(1, lambda a, b: Link.SYSTEM, busy={0: hidden})

    with pytest.raises(NoFreeGpuError, match=r"GPU 0 has 12\.0 GiB in use outside the appliance"):
        place(inventory, {}, GpuRequest(1))


def test_not_enough_gpus_in_the_box() -> None:
    inventory = _box(2, lambda a, b: Link.NVLINK)

    with pytest.raises(NoFreeGpuError, match=r"^needs 4 GPUs, the inventory has 2 \("):
        place(inventory, {}, GpuRequest(4))


def test_no_gpus_at_all_repeats_why_the_inventory_is_empty() -> None:
    with pytest.raises(NoFreeGpuError) as caught:
        place(EMPTY, {}, GpuRequest(1))

    assert caught.value.message.startswith("needs 1 GPU, the inventory has 0 (")
    assert EMPTY.message in caught.value.message


def test_whole_gpus_skip_gpus_shared_by_fractions() -> None:
    inventory = _box(2, lambda a, b: Link.NVLINK)

    assert place(inventory, {0: 0.45}, GpuRequest(1)) == (1,)
    with pytest.raises(NoFreeGpuError, match=r"GPU 0 has 0\.55 left; GPU 1 claimed"):
        place(inventory, {0: 0.45, 1: 1.0}, GpuRequest(1))


def test_fractions_pack_two_to_a_gpu_then_move_on() -> None:
    inventory = _box(4, _quads)
    request = GpuRequest(1, memory_fraction=0.45)
    claims: dict[int, float] = {}

    chosen = []
    for _ in range(3):
        (index,) = place(inventory, claims, request)
        claims[index] = claims.get(index, 0.0) + request.memory_fraction
        chosen.append(index)

    assert chosen == [0, 0, 1]


def test_fractions_that_do_not_add_up_to_one_gpu_do_not_share() -> None:
    inventory = _box(2, lambda a, b: Link.NVLINK)
    request = GpuRequest(1, memory_fraction=0.6)

    assert place(inventory, {0: 0.6}, request) == (1,)
    with pytest.raises(NoFreeGpuError) as caught:
        place(inventory, {0: 0.6, 1: 0.6}, request)
    assert caught.value.message == (
        "needs 0.6 of a GPU, none has room (GPU 0 has 0.40 left; GPU 1 has 0.40 left)"
    )


def test_fractions_go_to_the_fullest_gpu_that_fits() -> None:
    inventory = _box(4, _quads)
    request = GpuRequest(1, memory_fraction=0.3)

    assert place(inventory, {0: 0.2, 1: 0.5, 2: 0.8}, request) == (1,)


def test_fractions_fill_a_gpu_exactly_despite_float_sums() -> None:
    inventory = _box(2, lambda a, b: Link.NVLINK)

    # 0.34 + 0.56 + 0.1 is 1.0000000000000002 in floats.
    assert place(inventory, {0: 0.34 + 0.56}, GpuRequest(1, memory_fraction=0.1)) == (0,)


def test_a_process_on_a_gpu_the_appliance_shares_is_its_own() -> None:
    ours = _gpu(0, processes=(GpuProcess(pid=77, used_memory_bytes=30 * GIB),))
    inventory = _box(2, lambda a, b: Link.NVLINK, busy={0: ours})

    assert place(inventory, {0: 0.45}, GpuRequest(1, memory_fraction=0.45)) == (0,)


@pytest.mark.parametrize(("count", "fraction"), [(-1, 1.0), (2, 0.5), (1, 0.0), (1, 1.5)])
def test_requests_that_make_no_sense_are_refused(count: int, fraction: float) -> None:
    with pytest.raises(InvalidSpecError):
        GpuRequest(count, memory_fraction=fraction)
