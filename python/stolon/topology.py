"""Host topology discovery from sysfs (pure Python, stdlib only).

The engine uses this module to pair every GPU with its nearest NICs and to pin the worker threads
that drive a GPU on that GPU's NUMA node. Everything is read from sysfs (``/sys`` by default);
nothing here touches ``/proc/cpuinfo`` or any x86-only file, so it works on ARM hosts, in
containers (where parts of sysfs are missing) and on machines without GPUs. Missing or unreadable
files never raise: :func:`discover` returns whatever could be found.

What is read (all paths relative to the sysfs root):

* ``devices/system/cpu/online`` -- online CPUs (falls back to ``cpuN/online`` files, then to the
  union of the NUMA nodes' CPUs);
* ``devices/system/node/nodeN/{cpulist,distance}`` -- NUMA nodes;
* ``bus/pci/devices/<addr>/{class,vendor,device,numa_node,local_cpulist}`` -- PCI devices. GPUs
  are NVIDIA (vendor ``0x10de``) VGA or 3D controllers (class ``0x0300xx`` / ``0x0302xx``); EFA
  devices (vendor ``0x1d0f``, device ``0xefa0``-``0xefa3``) are NICs even when no driver is bound;
* ``class/net/<if>/device`` -- network interfaces backed by a PCI device (interfaces without a
  ``device`` link, such as ``lo`` or ``veth*``, are virtual and skipped; the link may point to a
  child of the PCI function, e.g. ``virtio2``, in which case the PCI ancestor is used);
* ``class/infiniband/<dev>/device`` and ``.../ports/<n>/{rate,link_layer,state}`` -- RDMA devices.

Netdevs and RDMA devices on the same PCI function are merged into one :class:`Nic`.

The PCI position of a device is taken from the real path of ``bus/pci/devices/<addr>``, e.g.
``devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0``: ``pci0000:15`` is the
root complex (host bridge), the PCI addresses before the device itself are its bridge chain (root
port, then switch ports). :func:`proximity` / :func:`distance` rank a GPU/NIC pair from that.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from fractions import Fraction
from typing import Any, Callable

# The text formats of the files read here; their public names are this module's too.
from ._sysfs_formats import (
    _pci_sort_key,
    format_cpulist,
    normalize_pci_address,
    parse_cpulist,
    parse_cpumask,
)

__all__ = [
    "EFA_DEVICE_IDS",
    "NVIDIA_VENDOR_ID",
    "Gpu",
    "Nic",
    "NumaNode",
    "PciDevice",
    "Proximity",
    "RdmaPort",
    "Topology",
    "discover",
    "distance",
    "format_cpulist",
    "main",
    "normalize_pci_address",
    "parse_cpulist",
    "parse_cpumask",
    "proximity",
]

NVIDIA_VENDOR_ID = 0x10DE
"""PCI vendor id of NVIDIA."""

AMAZON_VENDOR_ID = 0x1D0F
"""PCI vendor id of Amazon (ENA, EFA)."""

EFA_DEVICE_IDS = frozenset({0xEFA0, 0xEFA1, 0xEFA2, 0xEFA3})
"""PCI device ids of AWS Elastic Fabric Adapters (vendor :data:`AMAZON_VENDOR_ID`)."""

_GPU_CLASS_PREFIXES = frozenset({0x0300, 0x0302})  # VGA compatible, 3D controller

_PCI_ADDR_RE = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$", re.IGNORECASE)
_ROOT_COMPLEX_RE = re.compile(r"^pci[0-9a-f]{4,}:[0-9a-f]{2}$", re.IGNORECASE)
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*Gb/sec", re.IGNORECASE)

_TIER = 100  # distance() = proximity * _TIER + detail, detail in [0, _TIER)


# --------------------------------------------------------------------------------------------
# data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NumaNode:
    """A NUMA node: its id, CPUs (may be empty for memory-only nodes) and SLIT distances."""

    id: int
    cpus: tuple[int, ...]
    distances: tuple[int, ...] = ()
    """Row of the node distance matrix (``nodeN/distance``), indexed by node id; may be empty."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able representation."""
        return {"id": self.id, "cpus": list(self.cpus), "distances": list(self.distances)}


@dataclass(frozen=True)
class PciDevice:
    """A PCI function and its position in the PCI hierarchy."""

    address: str
    """Sysfs PCI address, ``dddd:bb:dd.f``."""
    vendor: int | None
    device: int | None
    class_code: int | None
    """24-bit PCI class code (``0x030200`` for a 3D controller)."""
    numa_node: int
    """NUMA node reported by the kernel; ``-1`` when unknown."""
    local_cpus: tuple[int, ...]
    """CPUs the kernel considers local to the device (``local_cpulist``); may be empty."""
    root_complex: str | None
    """Host bridge component of the sysfs path (``"pci0000:15"``), ``None`` if unknown."""
    bridges: tuple[str, ...]
    """PCI addresses between the root complex and the device: root port first, then switch ports;
    the device itself is not included."""
    sysfs_path: str
    """Resolved device directory, relative to the sysfs root (``devices/pci0000:15/...``)."""

    def base_dict(self) -> dict[str, Any]:
        """JSON-able representation of the PCI fields."""
        return {
            "address": self.address,
            "vendor": _hex(self.vendor, 4),
            "device": _hex(self.device, 4),
            "class": _hex(self.class_code, 6),
            "numa_node": self.numa_node,
            "local_cpus": list(self.local_cpus),
            "root_complex": self.root_complex,
            "bridges": list(self.bridges),
            "sysfs_path": self.sysfs_path,
        }


@dataclass(frozen=True)
class Gpu(PciDevice):
    """An NVIDIA GPU (VGA or 3D controller)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able representation."""
        return self.base_dict()


@dataclass(frozen=True)
class RdmaPort:
    """One port of an RDMA device (``class/infiniband/<device>/ports/<port>``)."""

    device: str
    port: int
    rate: str | None
    """Raw ``rate`` text, e.g. ``"400 Gb/sec (4X NDR)"``."""
    link_layer: str | None = None
    """``"InfiniBand"`` or ``"Ethernet"`` (RoCE)."""
    state: str | None = None
    """E.g. ``"4: ACTIVE"``."""

    @property
    def rate_gbps(self) -> float | None:
        """The rate in Gb/s, parsed from :attr:`rate`, or ``None``."""
        if self.rate is None:
            return None
        m = _RATE_RE.match(self.rate)
        return float(m.group(1)) if m else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able representation."""
        return {
            "device": self.device,
            "port": self.port,
            "rate": self.rate,
            "rate_gbps": self.rate_gbps,
            "link_layer": self.link_layer,
            "state": self.state,
        }


@dataclass(frozen=True)
class Nic(PciDevice):
    """A network PCI function: its netdevs, RDMA devices and RDMA ports."""

    netdevs: tuple[str, ...] = ()
    """Names from ``class/net`` backed by this PCI function."""
    rdma_devices: tuple[str, ...] = ()
    """Names from ``class/infiniband`` backed by this PCI function (``mlx5_0``, ``rdmap79s0``)."""
    ports: tuple[RdmaPort, ...] = field(default=())

    @property
    def is_efa(self) -> bool:
        """Whether this is an AWS Elastic Fabric Adapter."""
        return self.vendor == AMAZON_VENDOR_ID and self.device in EFA_DEVICE_IDS

    @property
    def rdma_capable(self) -> bool:
        """Whether the NIC has an RDMA device (or is an EFA, even without a bound driver)."""
        return bool(self.rdma_devices) or self.is_efa

    @property
    def kind(self) -> str:
        """``"efa"``, ``"rdma"`` (InfiniBand/RoCE device present) or ``"ethernet"``."""
        if self.is_efa:
            return "efa"
        return "rdma" if self.rdma_devices else "ethernet"

    @property
    def name(self) -> str:
        """Preferred name: the first RDMA device, else the first netdev, else the PCI address."""
        if self.rdma_devices:
            return self.rdma_devices[0]
        if self.netdevs:
            return self.netdevs[0]
        return self.address

    @property
    def rate_gbps(self) -> float | None:
        """Highest RDMA port rate in Gb/s, or ``None`` if unknown."""
        rates = [r for r in (p.rate_gbps for p in self.ports) if r is not None]
        return max(rates) if rates else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able representation."""
        d = self.base_dict()
        d.update(
            name=self.name,
            kind=self.kind,
            rdma_capable=self.rdma_capable,
            netdevs=list(self.netdevs),
            rdma_devices=list(self.rdma_devices),
            ports=[p.to_dict() for p in self.ports],
        )
        return d


def _hex(value: int | None, width: int) -> str | None:
    return None if value is None else f"0x{value:0{width}x}"


# --------------------------------------------------------------------------------------------
# distance
# --------------------------------------------------------------------------------------------


class Proximity(IntEnum):
    """How close two PCI devices are; smaller is closer (roughly ``nvidia-smi topo -m``)."""

    PCIE_SWITCH = 0
    """Share a PCIe bridge below the host bridge: same switch, or same root port (PIX/PXB)."""
    ROOT_COMPLEX = 1
    """Same root complex / host bridge, different root ports (PHB)."""
    NUMA_NODE = 2
    """Different root complexes on the same NUMA node (NODE)."""
    UNKNOWN_NUMA = 3
    """Different root complexes and at least one NUMA node is unknown (``-1``)."""
    CROSS_NUMA = 4
    """Different NUMA nodes (SYS)."""

    @property
    def label(self) -> str:
        """Lower-case name, e.g. ``"pcie_switch"``."""
        return self.name.lower()


def _common_bridges(a: PciDevice, b: PciDevice) -> int:
    if a.root_complex is None or a.root_complex != b.root_complex:
        return 0
    n = 0
    for x, y in zip(a.bridges, b.bridges, strict=False):
        if x != y:
            break
        n += 1
    return n


def proximity(a: PciDevice, b: PciDevice) -> Proximity:
    """The :class:`Proximity` category of two devices (typically a GPU and a NIC)."""
    if _common_bridges(a, b) > 0:
        return Proximity.PCIE_SWITCH
    if a.root_complex is not None and a.root_complex == b.root_complex:
        return Proximity.ROOT_COMPLEX
    if a.numa_node < 0 or b.numa_node < 0:
        return Proximity.UNKNOWN_NUMA
    if a.numa_node == b.numa_node:
        return Proximity.NUMA_NODE
    return Proximity.CROSS_NUMA


def distance(gpu: PciDevice, nic: PciDevice) -> int:
    """An integer distance between two devices; smaller is nearer.

    ``distance = 100 * proximity(gpu, nic) + detail``. Within :attr:`Proximity.PCIE_SWITCH`, the
    detail orders pairs by the length of the common bridge chain (longer is nearer: both sit
    behind a deeper switch), then by the number of bridges between the two devices through their
    deepest shared bridge. Other categories have no detail (0).
    """
    prox = proximity(gpu, nic)
    detail = 0
    if prox is Proximity.PCIE_SWITCH:
        common = _common_bridges(gpu, nic)
        hops = (len(gpu.bridges) - common) + (len(nic.bridges) - common)
        detail = 10 * (9 - min(common, 9)) + min(hops, 9)
    return int(prox) * _TIER + detail


# --------------------------------------------------------------------------------------------
# topology
# --------------------------------------------------------------------------------------------

GpuKey = Gpu | str | int


@dataclass(frozen=True)
class Topology:
    """What :func:`discover` found. All sequences are sorted (CPUs, node ids, PCI addresses)."""

    sysfs_root: str
    online_cpus: tuple[int, ...] = ()
    numa_nodes: tuple[NumaNode, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    nics: tuple[Nic, ...] = ()

    # ---- lookups ---------------------------------------------------------------------------

    @property
    def cpu_count(self) -> int:
        """Number of online CPUs."""
        return len(self.online_cpus)

    def gpu(self, key: GpuKey) -> Gpu:
        """Find a GPU by object, PCI address or index.

        Addresses may be in any form :func:`normalize_pci_address` accepts; an index is into
        :attr:`gpus` (PCI order -- equal to CUDA ordinals only with
        ``CUDA_DEVICE_ORDER=PCI_BUS_ID``).

        Raises:
            KeyError: if there is no such GPU.
        """
        if isinstance(key, Gpu):
            return key
        if isinstance(key, int):
            if 0 <= key < len(self.gpus):
                return self.gpus[key]
            raise KeyError(key)
        addr = normalize_pci_address(key)
        for g in self.gpus:
            if g.address == addr:
                return g
        raise KeyError(key)

    def nic(self, key: str) -> Nic:
        """Find a NIC by name (netdev or RDMA device) or PCI address.

        Raises:
            KeyError: if there is no such NIC.
        """
        for n in self.nics:
            if key in n.netdevs or key in n.rdma_devices or key == n.address:
                return n
        try:
            addr = normalize_pci_address(key)
        except ValueError:
            raise KeyError(key) from None
        for n in self.nics:
            if n.address == addr:
                return n
        raise KeyError(key)

    def numa_node(self, node_id: int) -> NumaNode | None:
        """The node with that id, or ``None``."""
        for node in self.numa_nodes:
            if node.id == node_id:
                return node
        return None

    def distance(self, gpu: GpuKey, nic: Nic | str) -> int:
        """:func:`distance` between a GPU and a NIC given by object, address or name."""
        return distance(self.gpu(gpu), nic if isinstance(nic, Nic) else self.nic(nic))

    def proximity(self, gpu: GpuKey, nic: Nic | str) -> Proximity:
        """:func:`proximity` between a GPU and a NIC given by object, address or name."""
        return proximity(self.gpu(gpu), nic if isinstance(nic, Nic) else self.nic(nic))

    # ---- CPU placement ---------------------------------------------------------------------

    def worker_cpus(self, gpu: GpuKey, allowed: Iterable[int] | None = None) -> list[int]:
        """CPUs to run the worker threads of ``gpu`` on.

        The CPUs of the GPU's NUMA node (the node's ``cpulist``, else the device's
        ``local_cpulist``),
        restricted to online CPUs; all online CPUs when the node is unknown (``-1``) or has no
        CPUs. CPU 0 (which takes most housekeeping interrupts) is left out if other CPUs remain.
        ``allowed`` (e.g. ``os.sched_getaffinity(0)``) further restricts the result unless that
        would leave nothing.
        """
        g = self.gpu(gpu)
        online = set(self.online_cpus)
        cpus: set[int] = set()
        if g.numa_node >= 0:
            node = self.numa_node(g.numa_node)
            for candidate in (node.cpus if node else (), g.local_cpus):
                cpus = set(candidate) & online if online else set(candidate)
                if cpus:
                    break
        if not cpus:
            cpus = set(online)
        if allowed is not None:
            restricted = cpus & set(allowed)
            if restricted:
                cpus = restricted
        if len(cpus) > 1:
            cpus.discard(0)
        return sorted(cpus)

    # ---- GPU/NIC pairing -------------------------------------------------------------------

    def pair_gpus_with_nics(
        self, max_nics_per_gpu: int = 4, *, prefer_rdma: bool = True
    ) -> dict[str, list[Nic]]:
        """Assign each GPU its nearest NICs; keys are GPU PCI addresses (every GPU is present).

        Rules, deterministic for a given topology:

        * With ``prefer_rdma`` and at least one RDMA-capable NIC, only RDMA-capable NICs count
          (a management Ethernet port is never chosen over a ConnectX or EFA).
        * A GPU's candidates are the NICs in its best :class:`Proximity` category to which no
          other GPU is strictly nearer (so a GPU does not take the NIC behind a neighbour's
          switch, but does take every NIC behind its own). A GPU left without candidates (no
          NIC near it is "its own") falls back to sharing the NICs at its minimal distance.
        * A GPU gets its fair share of its candidates -- ``sum(1 / sharers)`` over them, at least
          1 and at most ``max_nics_per_gpu`` -- handed out round-robin, most constrained GPU
          first, each time picking the least-loaded candidate (then nearest, then least wanted,
          then lowest address). 8 GPUs on 2 equally near NICs get 1 NIC each, 4 GPUs per NIC;
          2 GPUs sharing a switch with 2 NICs get one each; a GPU behind a switch with 4 EFAs
          gets those 4.
        * Finally, a GPU holding a shared NIC swaps it for any unassigned NIC at most as far
          away, so no NIC is assigned to two GPUs while an equally near one is unassigned.

        Each list is sorted by distance, then PCI address.

        Raises:
            ValueError: if ``max_nics_per_gpu`` < 1.
        """
        if max_nics_per_gpu < 1:
            raise ValueError("max_nics_per_gpu must be >= 1")
        gpus = list(self.gpus)
        nics = list(self.nics)
        if prefer_rdma and any(n.rdma_capable for n in nics):
            nics = [n for n in nics if n.rdma_capable]
        result: dict[str, list[Nic]] = {g.address: [] for g in gpus}
        if not gpus or not nics:
            return result

        gi_all, ni_all = range(len(gpus)), range(len(nics))
        dist = [[distance(g, n) for n in nics] for g in gpus]
        nearest_gpu = [min(dist[gi][ni] for gi in gi_all) for ni in ni_all]
        candidates: list[list[int]] = []
        for gi in gi_all:
            best_tier = min(dist[gi]) // _TIER
            own = [
                ni
                for ni in ni_all
                if dist[gi][ni] // _TIER == best_tier and dist[gi][ni] == nearest_gpu[ni]
            ]
            if not own:
                dmin = min(dist[gi])
                own = [ni for ni in ni_all if dist[gi][ni] == dmin]
            candidates.append(own)

        demand = [0] * len(nics)
        for cand in candidates:
            for ni in cand:
                demand[ni] += 1
        quota = []
        for cand in candidates:
            share = sum((Fraction(1, demand[ni]) for ni in cand), Fraction(0))
            quota.append(max(1, min(max_nics_per_gpu, len(cand), int(share))))

        load = [0] * len(nics)
        assigned: list[list[int]] = [[] for _ in gpus]
        nic_key = [_pci_sort_key(n.address) for n in nics]
        gpu_key = [_pci_sort_key(g.address) for g in gpus]

        # Sort keys over NIC indices for GPU gi (made per GPU, so no lambda captures a loop
        # variable).
        def least_loaded(gi: int) -> Callable[[int], tuple[Any, ...]]:
            return lambda ni: (load[ni], dist[gi][ni], demand[ni], nic_key[ni])

        def nearest(gi: int) -> Callable[[int], tuple[Any, ...]]:
            return lambda ni: (dist[gi][ni], demand[ni], nic_key[ni])

        def nearest_first(gi: int) -> Callable[[int], tuple[Any, ...]]:
            return lambda ni: (dist[gi][ni], nic_key[ni])

        for _ in range(max_nics_per_gpu):
            hungry = [gi for gi in gi_all if len(assigned[gi]) < quota[gi]]
            if not hungry:
                break
            hungry.sort(key=lambda gi: (len(candidates[gi]) - len(assigned[gi]), gpu_key[gi]))
            for gi in hungry:
                options = [ni for ni in candidates[gi] if ni not in assigned[gi]]
                if not options:
                    continue
                pick = min(options, key=least_loaded(gi))
                assigned[gi].append(pick)
                load[pick] += 1

        # Repair: never share a NIC while an equally near NIC is idle. Each swap makes one more
        # NIC busy, so this terminates.
        changed = True
        while changed:
            changed = False
            for gi in sorted(gi_all, key=lambda gi: gpu_key[gi]):
                for pos, ni in enumerate(assigned[gi]):
                    if load[ni] < 2:
                        continue
                    idle = [nj for nj in ni_all if load[nj] == 0 and dist[gi][nj] <= dist[gi][ni]]
                    if not idle:
                        continue
                    nj = min(idle, key=nearest(gi))
                    assigned[gi][pos] = nj
                    load[ni] -= 1
                    load[nj] += 1
                    changed = True

        for gi, g in enumerate(gpus):
            chosen = sorted(assigned[gi], key=nearest_first(gi))
            result[g.address] = [nics[ni] for ni in chosen]
        return result

    # ---- output ----------------------------------------------------------------------------

    def to_dict(self, max_nics_per_gpu: int = 4) -> dict[str, Any]:
        """JSON-able representation, including the derived pairing and worker CPUs per GPU."""
        pairing = self.pair_gpus_with_nics(max_nics_per_gpu)
        gpus = []
        for g in self.gpus:
            d = g.to_dict()
            d["nics"] = [n.address for n in pairing[g.address]]
            d["nic_names"] = [n.name for n in pairing[g.address]]
            d["worker_cpus"] = self.worker_cpus(g)
            gpus.append(d)
        return {
            "sysfs_root": self.sysfs_root,
            "online_cpus": list(self.online_cpus),
            "numa_nodes": [n.to_dict() for n in self.numa_nodes],
            "gpus": gpus,
            "nics": [n.to_dict() for n in self.nics],
        }

    def format_table(self, max_nics_per_gpu: int = 4) -> str:
        """Human-readable summary for ``stolon info``: GPUs, NICs, NUMA nodes."""
        online = format_cpulist(self.online_cpus) or "?"
        lines = [f"sysfs: {self.sysfs_root}   online CPUs: {online} ({self.cpu_count})"]
        pairing = self.pair_gpus_with_nics(max_nics_per_gpu)
        lines.append("")
        if self.gpus:
            rows = [["GPU", "PCI", "NUMA", "NICS", "WORKER CPUS"]]
            for i, g in enumerate(self.gpus):
                by_label: dict[str, list[str]] = {}
                for n in pairing[g.address]:
                    by_label.setdefault(proximity(g, n).label, []).append(n.name)
                nics = "; ".join(f"{','.join(v)} ({k})" for k, v in by_label.items())
                rows.append(
                    [
                        str(i),
                        g.address,
                        str(g.numa_node),
                        nics or "-",
                        format_cpulist(self.worker_cpus(g)) or "-",
                    ]
                )
            lines += _table(rows)
        else:
            lines.append("GPUs: none")
        lines.append("")
        if self.nics:
            rows = [["NIC", "PCI", "NUMA", "KIND", "NETDEVS", "RDMA", "RATE"]]
            for n in self.nics:
                rates = sorted({p.rate for p in n.ports if p.rate})
                rows.append(
                    [
                        n.name,
                        n.address,
                        str(n.numa_node),
                        n.kind,
                        ",".join(n.netdevs) or "-",
                        ",".join(n.rdma_devices) or "-",
                        "; ".join(rates) or "-",
                    ]
                )
            lines += _table(rows)
        else:
            lines.append("NICs: none")
        lines.append("")
        if self.numa_nodes:
            rows = [["NODE", "CPUS"]]
            rows += [[str(n.id), format_cpulist(n.cpus) or "-"] for n in self.numa_nodes]
            lines += _table(rows)
        else:
            lines.append("NUMA nodes: none")
        return "\n".join(lines)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


# --------------------------------------------------------------------------------------------
# sysfs reading
# --------------------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return None


def _read_int(path: str, base: int = 10) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _read_cpulist(path: str) -> list[int] | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return parse_cpulist(text)
    except ValueError:
        return None


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _num_suffix(name: str, prefix: str) -> int | None:
    rest = name[len(prefix) :]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def _read_online_cpus(root: str, nodes: Sequence[NumaNode]) -> tuple[int, ...]:
    cpu_dir = os.path.join(root, "devices", "system", "cpu")
    online = _read_cpulist(os.path.join(cpu_dir, "online"))
    if online is not None:
        return tuple(online)
    cpus = []
    for name in _listdir(cpu_dir):
        cpu = _num_suffix(name, "cpu")
        if cpu is None:
            continue
        flag = _read(os.path.join(cpu_dir, name, "online"))
        if flag is None or flag == "1":  # cpu0 usually has no 'online' file
            cpus.append(cpu)
    if cpus:
        return tuple(sorted(cpus))
    return tuple(sorted({c for n in nodes for c in n.cpus}))


def _read_numa_nodes(root: str) -> tuple[NumaNode, ...]:
    node_dir = os.path.join(root, "devices", "system", "node")
    nodes = []
    for name in _listdir(node_dir):
        node_id = _num_suffix(name, "node")
        if node_id is None:
            continue
        path = os.path.join(node_dir, name)
        cpus = _read_cpulist(os.path.join(path, "cpulist"))
        if cpus is None:
            text = _read(os.path.join(path, "cpumap"))
            try:
                cpus = parse_cpumask(text) if text is not None else []
            except ValueError:
                cpus = []
        dist_text = _read(os.path.join(path, "distance")) or ""
        try:
            distances = tuple(int(x) for x in dist_text.split())
        except ValueError:
            distances = ()
        nodes.append(NumaNode(id=node_id, cpus=tuple(cpus), distances=distances))
    return tuple(sorted(nodes, key=lambda n: n.id))


class _Reader:
    """Reads PCI devices below one sysfs root, caching by address."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_real = os.path.realpath(root)
        self.cache: dict[str, PciDevice] = {}

    def rel(self, real: str) -> list[str] | None:
        """Components of ``real`` relative to the sysfs root, or None if it lies outside."""
        rel = os.path.relpath(real, self.root_real)
        if rel == os.curdir or rel.startswith(os.pardir):
            return None
        return rel.split(os.sep)

    def pci_of_link(self, link: str) -> PciDevice | None:
        """The PCI function a ``device`` symlink leads to (or is a descendant of)."""
        if not os.path.lexists(link):
            return None
        parts = self.rel(os.path.realpath(link))
        if parts is None or parts[0] != "devices":
            return None
        for i in range(len(parts) - 1, -1, -1):
            if _PCI_ADDR_RE.match(parts[i]):
                return self.pci_at(parts[: i + 1])
        return None

    def pci_by_address(self, address: str) -> PciDevice | None:
        """The PCI function ``bus/pci/devices/<address>``."""
        link = os.path.join(self.root, "bus", "pci", "devices", address)
        parts = self.rel(os.path.realpath(link))
        if parts is None or not _PCI_ADDR_RE.match(parts[-1]):
            parts = None
        return self.pci_at(parts, link_fallback=link, address=address)

    def pci_at(
        self,
        parts: list[str] | None,
        *,
        link_fallback: str | None = None,
        address: str | None = None,
    ) -> PciDevice | None:
        """Build the :class:`PciDevice` whose directory is ``parts`` (relative to the root)."""
        if parts is not None:
            address = parts[-1].lower()
        if address is None:
            return None
        if address in self.cache:
            return self.cache[address]
        if parts is not None:
            path = os.path.join(self.root_real, *parts)
            root_complex = next((p.lower() for p in parts if _ROOT_COMPLEX_RE.match(p)), None)
            chain = [p.lower() for p in parts if _PCI_ADDR_RE.match(p)]
            bridges = tuple(chain[:-1])
            sysfs_path = "/".join(parts)
        elif link_fallback is not None and os.path.isdir(link_fallback):
            path, root_complex, bridges, sysfs_path = link_fallback, None, (), ""
        else:
            return None
        local = _read_cpulist(os.path.join(path, "local_cpulist"))
        if local is None:
            mask = _read(os.path.join(path, "local_cpus"))
            try:
                local = parse_cpumask(mask) if mask is not None else []
            except ValueError:
                local = []
        numa = _read_int(os.path.join(path, "numa_node"))
        dev = PciDevice(
            address=address,
            vendor=_read_int(os.path.join(path, "vendor"), 16),
            device=_read_int(os.path.join(path, "device"), 16),
            class_code=_read_int(os.path.join(path, "class"), 16),
            numa_node=numa if numa is not None and numa >= 0 else -1,
            local_cpus=tuple(local),
            root_complex=root_complex,
            bridges=bridges,
            sysfs_path=sysfs_path,
        )
        self.cache[address] = dev
        return dev


def _is_gpu(dev: PciDevice) -> bool:
    return (
        dev.vendor == NVIDIA_VENDOR_ID
        and dev.class_code is not None
        and (dev.class_code >> 8) in _GPU_CLASS_PREFIXES
    )


def _is_efa(dev: PciDevice) -> bool:
    return dev.vendor == AMAZON_VENDOR_ID and dev.device in EFA_DEVICE_IDS


def _read_ports(ib_dir: str, device: str) -> list[RdmaPort]:
    ports_dir = os.path.join(ib_dir, "ports")
    ports = []
    for name in _listdir(ports_dir):
        if not name.isdigit():
            continue
        p = os.path.join(ports_dir, name)
        ports.append(
            RdmaPort(
                device=device,
                port=int(name),
                rate=_read(os.path.join(p, "rate")),
                link_layer=_read(os.path.join(p, "link_layer")),
                state=_read(os.path.join(p, "state")),
            )
        )
    return sorted(ports, key=lambda x: x.port)


def discover(sysfs_root: str | os.PathLike[str] = "/sys") -> Topology:
    """Discover CPUs, NUMA nodes, GPUs and NICs from the sysfs tree at ``sysfs_root``.

    Never raises for missing or unreadable files: a missing root gives an empty topology.
    """
    root = os.fspath(sysfs_root)
    reader = _Reader(root)
    nodes = _read_numa_nodes(root)
    online = _read_online_cpus(root, nodes)

    gpus: dict[str, PciDevice] = {}
    nic_devs: dict[str, PciDevice] = {}
    for addr in _listdir(os.path.join(root, "bus", "pci", "devices")):
        if not _PCI_ADDR_RE.match(addr):
            continue
        dev = reader.pci_by_address(addr)
        if dev is None:
            continue
        if _is_gpu(dev):
            gpus[dev.address] = dev
        elif _is_efa(dev):
            nic_devs[dev.address] = dev

    netdevs: dict[str, list[str]] = {}
    net_dir = os.path.join(root, "class", "net")
    for name in _listdir(net_dir):
        dev = reader.pci_of_link(os.path.join(net_dir, name, "device"))
        if dev is None:
            continue
        nic_devs.setdefault(dev.address, dev)
        netdevs.setdefault(dev.address, []).append(name)

    rdma: dict[str, list[str]] = {}
    ports: dict[str, list[RdmaPort]] = {}
    ib_root = os.path.join(root, "class", "infiniband")
    for name in _listdir(ib_root):
        dev = reader.pci_of_link(os.path.join(ib_root, name, "device"))
        if dev is None:
            continue
        nic_devs.setdefault(dev.address, dev)
        rdma.setdefault(dev.address, []).append(name)
        ports.setdefault(dev.address, []).extend(_read_ports(os.path.join(ib_root, name), name))

    def base(dev: PciDevice) -> dict[str, Any]:
        return {f: getattr(dev, f) for f in PciDevice.__dataclass_fields__}

    gpu_list = [Gpu(**base(gpus[a])) for a in sorted(gpus, key=_pci_sort_key)]
    nic_list = [
        Nic(
            **base(nic_devs[a]),
            netdevs=tuple(netdevs.get(a, ())),
            rdma_devices=tuple(rdma.get(a, ())),
            ports=tuple(ports.get(a, ())),
        )
        for a in sorted(nic_devs, key=_pci_sort_key)
        if a not in gpus
    ]
    return Topology(
        sysfs_root=root,
        online_cpus=online,
        numa_nodes=nodes,
        gpus=tuple(gpu_list),
        nics=tuple(nic_list),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``stolon info``: print the discovered topology as a table or JSON."""
    parser = argparse.ArgumentParser(prog="stolon info", description="Show the host topology.")
    parser.add_argument("--sysfs", default="/sys", help="sysfs root (default: /sys)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--max-nics-per-gpu", type=int, default=4)
    args = parser.parse_args(argv)
    topo = discover(args.sysfs)
    if args.json:
        print(json.dumps(topo.to_dict(args.max_nics_per_gpu), indent=2))
    else:
        print(topo.format_table(args.max_nics_per_gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
