"""Reads the GPU inventory from the NVIDIA driver through NVML; the builder's loop calls it
through `gpu.inventory.load_gpu_source`. The only module that imports pynvml.

A host without the library or the driver gets an empty inventory whose message says why, and a
GPU that fails to answer is left out and named in the message: never an exception for a
missing GPU. Every call here blocks, so async code must reach it through a thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping
from typing import Any

import pynvml

from gpu.inventory import Gpu, GpuProcess, Inventory, Link

logger = logging.getLogger(__name__)

_NO_GPUS = "no GPUs; endpoints must use gpus=0"

_TOPOLOGY_LEVELS = {
    pynvml.NVML_TOPOLOGY_INTERNAL: Link.PCIE_SINGLE,  # two GPUs on one board
    pynvml.NVML_TOPOLOGY_SINGLE: Link.PCIE_SINGLE,
    pynvml.NVML_TOPOLOGY_MULTIPLE: Link.PCIE_MULTIPLE,
    pynvml.NVML_TOPOLOGY_HOSTBRIDGE: Link.PCIE_HOSTBRIDGE,
    pynvml.NVML_TOPOLOGY_NODE: Link.NUMA_NODE,
    pynvml.NVML_TOPOLOGY_SYSTEM: Link.SYSTEM,
}


class NvmlGpuSource:
    """A `GpuSource` that asks NVML on every `read`; initialises NVML once, on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._initialized = False

    def read(self) -> Inventory:
        problem = self._init()
        if problem is not None:
            return Inventory(gpus=(), message=f"NVML not available ({problem}): {_NO_GPUS}")
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as exc:
            logger.warning("NVML failed to list GPUs: %s", exc)
            return Inventory(gpus=(), message=f"NVML failed to list GPUs ({exc}): {_NO_GPUS}")
        handles: dict[int, Any] = {}
        gpus: list[Gpu] = []
        lost: list[str] = []
        for index in range(count):
            try:
                handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(_read_gpu(index, handles[index]))
            except pynvml.NVMLError as exc:
                logger.warning("NVML failed to read GPU %d: %s", index, exc)
                handles.pop(index, None)
                lost.append(f"GPU {index} unreadable ({exc})")
        topology = _read_topology(handles, gpus)
        message = f"{len(gpus)} GPU{'' if len(gpus) == 1 else 's'} via NVML, driver {driver}"
        if lost:
            message += "; " + "; ".join(lost)
        return Inventory(tuple(gpus), topology, driver, message)

    def _init(self) -> str | None:
        """Initialise NVML unless done; None when ready, else why not (retried next read)."""
        with self._lock:
            if self._initialized:
                return None
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError_LibraryNotFound:
                return "libnvidia-ml.so.1 not found"
            except pynvml.NVMLError_DriverNotLoaded:
                return "NVIDIA driver not loaded"
            except pynvml.NVMLError as exc:
                return f"nvmlInit failed: {exc}"
            self._initialized = True
            return None


def _read_gpu(index: int, handle: Any) -> Gpu:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return Gpu(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        memory_free_bytes=int(memory.free),
        utilization_percent=_utilization(handle),
        processes=_processes(handle),
        pci_bus_id=_text(pynvml.nvmlDeviceGetPciInfo(handle).busId),
    )


def _utilization(handle: Any) -> int | None:
    try:
        return int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError:  # NotSupported on some boards and under MIG
        return None


def _processes(handle: Any) -> tuple[GpuProcess, ...]:
    try:
        found = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError as exc:
        # Placement still sees the GPU's used memory, so a busy GPU is not taken for free.
        logger.warning("NVML cannot list compute processes: %s", exc)
        return ()
    # usedGpuMemory is None where the driver cannot tell (WDDM, some containers).
    return tuple(GpuProcess(int(p.pid), int(p.usedGpuMemory or 0)) for p in found)


def _read_topology(handles: Mapping[int, Any], gpus: list[Gpu]) -> dict[frozenset[int], Link]:
    """The PCIe level of each pair, raised to NVLink where the pair shares an NVLink."""
    by_bus = {_bus_key(gpu.pci_bus_id): gpu.index for gpu in gpus}
    links = {index: _nvlinks(handle, by_bus) for index, handle in handles.items()}
    topology: dict[frozenset[int], Link] = {}
    for a, b in itertools.combinations(sorted(handles), 2):
        (peers_a, switch_a), (peers_b, switch_b) = links[a], links[b]
        if b in peers_a or a in peers_b or (switch_a and switch_b):
            topology[frozenset((a, b))] = Link.NVLINK
            continue
        try:
            level = pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b])
        except pynvml.NVMLError as exc:  # the pair then counts as SYSTEM
            logger.warning("NVML has no topology for GPUs %d and %d: %s", a, b, exc)
            continue
        topology[frozenset((a, b))] = _TOPOLOGY_LEVELS.get(int(level), Link.SYSTEM)
    return topology


def _nvlinks(handle: Any, by_bus: Mapping[str, int]) -> tuple[set[int], bool]:
    """The GPUs at the far end of this GPU's active NVLinks, and whether one ends at an NVSwitch.

    GPUs on one switch fabric (HGX and DGX boards) reach each other over NVLink although no
    link joins them directly.
    """
    peers: set[int] = set()
    switch = False
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            if not pynvml.nvmlDeviceGetNvLinkState(handle, link):
                continue
            remote = _bus_key(_text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId))
        except pynvml.NVMLError:
            # NotSupported: a GPU without NVLink; InvalidArgument: past this GPU's link count.
            continue
        if remote in by_bus:
            peers.add(by_bus[remote])
        else:  # an NVSwitch, a GPU hidden from this process, or an IBM CPU's NVLink port
            switch = switch or _ends_at_switch(handle, link)
    return peers, switch


def _ends_at_switch(handle: Any, link: int) -> bool:
    try:
        kind = pynvml.nvmlDeviceGetNvLinkRemoteDeviceType(handle, link)
    except pynvml.NVMLError:  # drivers before 450 cannot tell; on x86 it is a switch
        return True
    return bool(kind == pynvml.NVML_NVLINK_DEVICE_TYPE_SWITCH)


def _bus_key(bus_id: str) -> str:
    """A PCI bus id in one spelling: NVML pads the domain to 8 hex digits in some places."""
    parts = bus_id.strip().lower().split(":")
    if len(parts) != 3:
        return bus_id.strip().lower()
    try:
        return f"{int(parts[0], 16):04x}:{parts[1]}:{parts[2]}"
    except ValueError:
        return bus_id.strip().lower()


def _text(value: str | bytes) -> str:
    """NVML strings arrive as bytes from older pynvml releases and from struct fields."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
