"""Tests for gpu.nvml against the machine's real driver: an empty, explained inventory where
there is none, and the real GPUs (checked against nvidia-smi) where there are."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import NoReturn

import pynvml
import pytest

from gpu.inventory import GpuProcess, Link
from gpu.nvml import NvmlGpuSource

MIB = 1 << 20
NO_GPU = "no NVIDIA GPU/driver present: nvidia-smi is missing or fails"


def _nvidia_smi(*fields: str) -> list[list[str]] | None:
    """nvidia-smi's answer per GPU, or None where there is no working driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
    result = subprocess.run(query, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return None
    rows = [line for line in result.stdout.splitlines() if line.strip()]
    return [[cell.strip() for cell in row.split(",")] for row in rows]


def test_read_never_raises_and_says_what_it_found() -> None:
    inventory = NvmlGpuSource().read()
    smi = _nvidia_smi("index")

    if smi is None:
        assert inventory.gpus == ()
        assert inventory.topology == {}
        assert inventory.message.startswith("NVML not available (")
        assert inventory.message.endswith("): no GPUs; endpoints must use gpus=0")
    else:
        assert len(inventory.gpus) == len(smi)
        assert inventory.message.startswith(f"{len(smi)} GPU")
        assert "via NVML" in inventory.message


def test_concurrent_reads_initialise_once_and_agree() -> None:
    source = NvmlGpuSource()

    with ThreadPoolExecutor(max_workers=8) as pool:
        inventories = list(pool.map(lambda _: source.read(), range(16)))

    assert {inv.message for inv in inventories} == {inventories[0].message}
    assert {tuple(g.uuid for g in inv.gpus) for inv in inventories} == {
        tuple(g.uuid for g in inventories[0].gpus)
    }


@pytest.mark.gpu
def test_real_gpus_match_nvidia_smi() -> None:
    smi = _nvidia_smi("index", "name", "uuid", "memory.total", "pci.bus_id", "driver_version")
    if not smi:
        pytest.skip(NO_GPU)

    inventory = NvmlGpuSource().read()

    assert len(inventory.gpus) == len(smi)
    for gpu, (index, name, uuid, total_mib, bus_id, driver) in zip(
        inventory.gpus, smi, strict=True
    ):
        assert (gpu.index, gpu.name, gpu.uuid) == (int(index), name, uuid)
        assert abs(gpu.memory_total_bytes / MIB - int(total_mib)) <= 1
        assert 0 <= gpu.memory_used_bytes <= gpu.memory_total_bytes
        assert 0 <= gpu.memory_free_bytes <= gpu.memory_total_bytes
        assert gpu.pci_bus_id.lower() == bus_id.lower()
        assert inventory.driver_version == driver
    pairs = len(inventory.gpus) * (len(inventory.gpus) - 1) // 2
    assert len(inventory.topology) == pairs


# What the NVLink and error paths do cannot be seen on a machine without such GPUs, so the
# tests below put a stand-in driver under the real module: five A100s where GPUs 0 and 1 are
# NVLinked to each other, 2 and 3 reach each other through an NVSwitch, and GPU 4 is lost.
GIB = 1 << 30
BUS = ["00000000:18:00.0", "00000000:2A:00.0", "00000000:3A:00.0", "00000000:5D:00.0"]
SWITCH_BUS = "00000000:C5:00.0"


def _fail(code: int) -> NoReturn:
    raise pynvml.NVMLError(code)


class FakeDriver:
    """The pynvml calls gpu.nvml makes, answering for the box described above."""

    def __init__(self) -> None:
        self.init_error: int | None = None

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            _fail(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return 5

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"535.161.08"  # bytes, as older pynvml releases return

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return _fail(pynvml.NVML_ERROR_GPU_IS_LOST) if index == 4 else index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-fake-{handle}"

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return b"NVIDIA A100-SXM4-80GB" if handle == 3 else "NVIDIA A100-SXM4-80GB"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(total=80 * GIB, used=handle * GIB, free=(80 - handle) * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if handle == 1:
            _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=10 * handle)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=100, usedGpuMemory=None)] if handle == 0 else []

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(busId=BUS[handle].encode())

    def nvmlDeviceGetNvLinkState(self, handle: int, link: int) -> int:
        links = 2 if handle < 2 else 4
        return 1 if link < links else _fail(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: int, link: int) -> SimpleNamespace:
        remote = {0: BUS[1], 1: BUS[0].replace("00000000:", "0000:")}.get(handle, SWITCH_BUS)
        return SimpleNamespace(busId=remote.encode())

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: int, link: int) -> int:
        return int(pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH)

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        if {a, b} == {1, 3}:
            _fail(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return int(pynvml.NVML_TOPOLOGY_SINGLE if {a, b} == {0, 2} else pynvml.NVML_TOPOLOGY_SYSTEM)


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver()
    for name in dir(fake):
        if name.startswith("nvml"):
            monkeypatch.setattr(pynvml, name, getattr(fake, name))
    return fake


def test_stand_in_driver_gpus_links_and_a_lost_gpu(driver: FakeDriver) -> None:
    inventory = NvmlGpuSource().read()

    assert [gpu.index for gpu in inventory.gpus] == [0, 1, 2, 3]
    assert {gpu.name for gpu in inventory.gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert inventory.driver_version == "535.161.08"
    assert inventory.gpus[0].processes == (GpuProcess(pid=100, used_memory_bytes=0),)
    assert [gpu.utilization_percent for gpu in inventory.gpus] == [0, None, 20, 30]
    assert inventory.gpus[2].pci_bus_id == BUS[2]
    assert inventory.message == "4 GPUs via NVML, driver 535.161.08; GPU 4 unreadable (GPU is lost)"
    assert inventory.topology == {
        frozenset((0, 1)): Link.NVLINK,  # a direct link
        frozenset((2, 3)): Link.NVLINK,  # through the switch
        frozenset((0, 2)): Link.PCIE_SINGLE,
        frozenset((0, 3)): Link.SYSTEM,
        frozenset((1, 2)): Link.SYSTEM,
    }


def test_a_driver_that_loads_later_is_found_on_the_next_read(driver: FakeDriver) -> None:
    source = NvmlGpuSource()
    driver.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED

    first = source.read()
    driver.init_error = None
    second = source.read()

    assert first.gpus == ()
    assert first.message == (
        "NVML not available (NVIDIA driver not loaded): no GPUs; endpoints must use gpus=0"
    )
    assert len(second.gpus) == 4
