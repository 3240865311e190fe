"""The GPU inventory as values, its JSON form, and the injected-file source; read by the builder
(placement) and by the api (`GET /v1/gpus`).

An `Inventory` is what one look at the box saw: its GPUs, what runs on them, and how each pair
is linked. A `GpuSource` produces one; `NvmlGpuSource` (gpu.nvml) asks the driver and
`StaticGpuSource` reads a JSON file, which is how tests and GPU-less hosts inject GPUs.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Link(enum.IntEnum):
    """How two GPUs are connected, best to worst; NVML's topology levels plus NVLink.

    The values are NVML's `NVML_TOPOLOGY_*` numbers, with NVLink below them all, so that the
    steps are even and a sum of levels means something.
    """

    NVLINK = 0
    PCIE_SINGLE = 10  # PIX: one PCIe switch
    PCIE_MULTIPLE = 20  # PXB: several PCIe switches, no host bridge
    PCIE_HOSTBRIDGE = 30  # PHB: through a CPU's host bridge
    NUMA_NODE = 40  # NODE: host bridges within one NUMA node
    SYSTEM = 50  # SYS: across NUMA nodes (SMP interconnect)


# The column names `nvidia-smi topo -m` prints, accepted in inventory files ("NV12" too).
_SMI_LINK_NAMES = {
    "PIX": Link.PCIE_SINGLE,
    "PXB": Link.PCIE_MULTIPLE,
    "PHB": Link.PCIE_HOSTBRIDGE,
    "NODE": Link.NUMA_NODE,
    "SYS": Link.SYSTEM,
}
_SMI_NVLINK = re.compile(r"NV\d+")


@dataclass(frozen=True)
class GpuProcess:
    """A compute process using a GPU; memory is 0 where the driver does not say."""

    pid: int
    used_memory_bytes: int


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML numbers it, with its memory, load and compute processes."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int | None
    processes: tuple[GpuProcess, ...]
    pci_bus_id: str


@dataclass(frozen=True)
class Inventory:
    """The GPUs of the box, the link between each pair of them, and a line for humans.

    `topology` is keyed by the pair of GPU indices; a pair it lacks counts as `Link.SYSTEM`.
    """

    gpus: tuple[Gpu, ...]
    topology: Mapping[frozenset[int], Link] = field(default_factory=dict)
    driver_version: str | None = None
    message: str = ""

    def link(self, a: int, b: int) -> Link:
        """The link between GPUs `a` and `b` (worst when unknown)."""
        return self.topology.get(frozenset((a, b)), Link.SYSTEM)

    def to_json(self) -> dict[str, Any]:
        """A plain dict for json.dumps: the injected-file format and `GET /v1/gpus`."""
        links = sorted((sorted(pair), link) for pair, link in self.topology.items())
        return {
            "driver_version": self.driver_version,
            "message": self.message,
            "gpus": [_gpu_to_json(gpu) for gpu in self.gpus],
            "links": [{"gpus": pair, "link": link.name} for pair, link in links],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Inventory:
        """The inverse of `to_json`; raises ValueError saying what is wrong with `data`."""
        try:
            gpus = tuple(_gpu_from_json(gpu) for gpu in data["gpus"])
            topology = dict(_link_from_json(link) for link in data.get("links", ()))
            driver = data.get("driver_version")
            message = str(data.get("message", ""))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"bad GPU inventory: {exc!r}") from exc
        indices = [gpu.index for gpu in gpus]
        if len(set(indices)) != len(indices):
            raise ValueError(f"bad GPU inventory: repeated GPU index in {indices}")
        return cls(gpus, topology, None if driver is None else str(driver), message)


EMPTY = Inventory(gpus=(), message="no GPUs in the inventory; endpoints must use gpus=0")


def _gpu_to_json(gpu: Gpu) -> dict[str, Any]:
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "memory_total_bytes": gpu.memory_total_bytes,
        "memory_used_bytes": gpu.memory_used_bytes,
        "memory_free_bytes": gpu.memory_free_bytes,
        "utilization_percent": gpu.utilization_percent,
        "processes": [
            {"pid": p.pid, "used_memory_bytes": p.used_memory_bytes} for p in gpu.processes
        ],
        "pci_bus_id": gpu.pci_bus_id,
    }


def _gpu_from_json(data: Mapping[str, Any]) -> Gpu:
    total = int(data["memory_total_bytes"])
    used = int(data.get("memory_used_bytes", 0))
    utilization = data.get("utilization_percent")
    return Gpu(
        index=int(data["index"]),
        uuid=str(data["uuid"]),
        name=str(data["name"]),
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=int(data.get("memory_free_bytes", total - used)),
        utilization_percent=None if utilization is None else int(utilization),
        processes=tuple(
            GpuProcess(int(p["pid"]), int(p.get("used_memory_bytes", 0)))
            for p in data.get("processes", ())
        ),
        pci_bus_id=str(data.get("pci_bus_id", "")),
    )


def _link_from_json(data: Mapping[str, Any]) -> tuple[frozenset[int], Link]:
    a, b = (int(i) for i in data["gpus"])
    if a == b:
        raise ValueError(f"a link joins two different GPUs, not {a} and {b}")
    return frozenset((a, b)), parse_link(str(data["link"]))


def parse_link(name: str) -> Link:
    """A `Link` from its name ("NVLINK") or from `nvidia-smi topo -m`'s ("NV12", "PIX", "SYS")."""
    name = name.strip().upper()
    if _SMI_NVLINK.fullmatch(name):
        return Link.NVLINK
    if name in _SMI_LINK_NAMES:
        return _SMI_LINK_NAMES[name]
    try:
        return Link[name]
    except KeyError:
        known = ", ".join([*Link.__members__, *_SMI_LINK_NAMES, "NV<n>"])
        raise ValueError(f"unknown GPU link {name!r}; use one of {known}") from None


class GpuSource(Protocol):
    """Where the builder and the api get the inventory from."""

    def read(self) -> Inventory:
        """Look at the GPUs now; never raises because a GPU or the driver is missing."""
        ...


class StaticGpuSource:
    """An inventory from a JSON file (`APPLIANCE_GPU_INVENTORY_FILE`), in `to_json`'s format.

    The file is read once here, so a bad one fails at start, and again on every `read`, so a
    test or an operator can change what the appliance sees (a foreign process, say) while it runs.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.read()

    def read(self) -> Inventory:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            inventory = Inventory.from_json(data)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read GPU inventory file {self.path}: {exc}") from exc
        if inventory.message:
            return inventory
        count = len(inventory.gpus)
        message = f"{count} GPU{'' if count == 1 else 's'} from inventory file {self.path}"
        return Inventory(inventory.gpus, inventory.topology, inventory.driver_version, message)


def load_gpu_source(inventory_file: str | None) -> GpuSource:
    """The injected file's source when settings name one, else the driver's (NVML)."""
    if inventory_file:
        return StaticGpuSource(inventory_file)
    # Imported here: gpu.nvml builds on this module, and GPU-less hosts with an inventory
    # file never need pynvml loaded.
    from gpu.nvml import NvmlGpuSource

    return NvmlGpuSource()
