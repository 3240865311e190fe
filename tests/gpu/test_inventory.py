"""Tests for gpu.inventory: the JSON form, the injected-file source, the empty inventory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu.inventory import (
    EMPTY,
    Gpu,
    GpuProcess,
    Inventory,
    Link,
    StaticGpuSource,
    load_gpu_source,
    parse_link,
)
from gpu.nvml import NvmlGpuSource

GIB = 1 << 30
EIGHT_H100 = Path(__file__).with_name("eight_h100.json")


def _two_gpus() -> Inventory:
    busy = Gpu(
        index=0,
        uuid="GPU-0b4e-busy",
        name="NVIDIA L4",
        memory_total_bytes=24 * GIB,
        memory_used_bytes=5 * GIB,
        memory_free_bytes=19 * GIB,
        utilization_percent=87,
        processes=(GpuProcess(pid=4242, used_memory_bytes=5 * GIB), GpuProcess(7, 0)),
        pci_bus_id="00000000:01:00.0",
    )
    idle = Gpu(
        index=1,
        uuid="GPU-0b4e-idle",
        name="NVIDIA L4",
        memory_total_bytes=24 * GIB,
        memory_used_bytes=0,
        memory_free_bytes=24 * GIB,
        utilization_percent=None,
        processes=(),
        pci_bus_id="00000000:02:00.0",
    )
    topology = {frozenset((0, 1)): Link.PCIE_HOSTBRIDGE}
    return Inventory((busy, idle), topology, driver_version="550.54.15", message="two L4s")


def test_json_round_trip_through_text_keeps_everything() -> None:
    inventory = _two_gpus()

    text = json.dumps(inventory.to_json())

    assert Inventory.from_json(json.loads(text)) == inventory
    assert json.loads(text)["links"] == [{"gpus": [0, 1], "link": "PCIE_HOSTBRIDGE"}]


def test_static_source_reads_a_file_and_sees_it_change(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    inventory = _two_gpus()
    path.write_text(json.dumps(inventory.to_json()))
    source = StaticGpuSource(path)

    assert source.read() == inventory

    idle = Inventory(inventory.gpus[1:], {}, None, "")
    path.write_text(json.dumps(idle.to_json()))
    assert source.read().gpus == idle.gpus
    assert source.read().message == f"1 GPU from inventory file {path}"


def test_the_shipped_eight_h100_file_has_nvlink_pairs() -> None:
    inventory = StaticGpuSource(EIGHT_H100).read()

    assert [gpu.index for gpu in inventory.gpus] == list(range(8))
    assert {gpu.name for gpu in inventory.gpus} == {"NVIDIA H100 80GB HBM3"}
    assert all(gpu.memory_free_bytes == 80 * GIB for gpu in inventory.gpus)
    assert inventory.link(6, 7) == Link.NVLINK
    assert inventory.link(1, 2) == Link.SYSTEM


def test_a_bad_file_fails_when_the_source_is_made(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text('{"gpus": [{"index": 0}]}')

    with pytest.raises(ValueError, match=r"cannot read GPU inventory file .*gpus\.json"):
        StaticGpuSource(path)
    with pytest.raises(ValueError, match="cannot read GPU inventory file"):
        StaticGpuSource(tmp_path / "missing.json")


def test_repeated_indices_are_refused() -> None:
    data = _two_gpus().to_json()
    data["gpus"][1]["index"] = 0

    with pytest.raises(ValueError, match="repeated GPU index"):
        Inventory.from_json(data)


def test_links_accept_nvidia_smi_names_and_refuse_others() -> None:
    assert parse_link("NV18") == Link.NVLINK
    assert parse_link("pix") == Link.PCIE_SINGLE
    assert parse_link("SYS") == Link.SYSTEM
    assert parse_link("NUMA_NODE") == Link.NUMA_NODE
    with pytest.raises(ValueError, match="unknown GPU link 'QPI'"):
        parse_link("QPI")


def test_links_are_ordered_best_to_worst_and_unknown_pairs_are_worst() -> None:
    assert list(Link) == sorted(Link)
    assert (min(Link), max(Link)) == (Link.NVLINK, Link.SYSTEM)
    assert _two_gpus().link(1, 0) == Link.PCIE_HOSTBRIDGE
    assert _two_gpus().link(0, 5) == Link.SYSTEM


def test_the_empty_inventory_says_endpoints_need_no_gpus() -> None:
    assert EMPTY.gpus == ()
    assert "gpus=0" in EMPTY.message
    assert Inventory.from_json(EMPTY.to_json()) == EMPTY


def test_load_gpu_source_prefers_the_injected_file() -> None:
    assert isinstance(load_gpu_source(str(EIGHT_H100)), StaticGpuSource)
    assert isinstance(load_gpu_source(None), NvmlGpuSource)
    assert isinstance(load_gpu_source(""), NvmlGpuSource)
