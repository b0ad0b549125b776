"""Builders for fake sysfs trees, shaped like Linux sysfs, for topology tests.

:class:`FakeSysfs` creates real directories, files and *relative* symlinks in a temporary
directory, the way the kernel lays them out::

    devices/pci0000:15/0000:15:01.0/0000:16:00.0/.../0000:1a:00.0/{class,vendor,device,...}
    bus/pci/devices/0000:1a:00.0 -> ../../../devices/pci0000:15/.../0000:1a:00.0
    devices/.../0000:1b:00.0/net/ibp27s0/device -> ../../../0000:1b:00.0
    class/net/ibp27s0 -> ../../devices/.../0000:1b:00.0/net/ibp27s0
    devices/.../0000:1b:00.0/infiniband/mlx5_0/{device,ports/1/rate}
    class/infiniband/mlx5_0 -> ../../devices/.../0000:1b:00.0/infiniband/mlx5_0
    devices/system/node/node0/{cpulist,distance}
    devices/system/cpu/online

Ready-made hosts (each returns a :class:`FakeHost` with the expected outcomes):

* :func:`build_dgx_h100` -- dual socket, 8 H100 + 8 ConnectX-7 behind two-level PCIe switches,
  plus a storage NIC, a management NIC, a BMC VGA and NVSwitches as distractors;
* :func:`build_aws_p5` -- 8 H100 and 32 EFA (4 behind each GPU's switch), plus the ENA;
* :func:`build_grace_hopper` -- ARM (no x86 files), CPUs 0-71, a memory-only NUMA node, GPU and
  a dual-function NIC on different root complexes, NIC ``numa_node`` = -1;
* :func:`build_cloud_vm` -- single GPU VM, ``numa_node`` = -1 everywhere, no ``node`` directory,
  a virtio NIC whose ``device`` link points at the virtio child of the PCI function.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BRIDGE_CLASS = 0x060400
NVIDIA = 0x10DE
MELLANOX = 0x15B3
AMAZON = 0x1D0F
INTEL = 0x8086
BROADCOM = 0x1000

H100_SXM = 0x2330
GH100_GH200 = 0x2342
A10G = 0x2237
NVSWITCH = 0x22A3
CONNECTX7 = 0x1021
EFA_GEN2 = 0xEFA1
ENA = 0xEC20


@dataclass
class FakeSysfs:
    """A fake sysfs tree rooted at :attr:`root` (created on construction)."""

    root: Path
    dirs: dict[str, Path] = field(default_factory=dict)
    """Absolute directory of every root complex (``pci0000:15``) and PCI function added."""

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- low level ---------------------------------------------------------------------------

    def write(self, rel: str | Path, text: str) -> Path:
        """Write ``text`` plus a newline (as sysfs does) to ``root/rel``."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        return path

    @staticmethod
    def link(link: Path, target: Path) -> None:
        """Create ``link`` as a relative symlink to ``target``."""
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    # ---- CPUs and NUMA -----------------------------------------------------------------------

    def cpus(
        self,
        online: str | None,
        nodes: Mapping[int, str] | None = None,
        distances: Mapping[int, str] | None = None,
    ) -> None:
        """Write ``devices/system/cpu/online`` and ``devices/system/node/nodeN/*``."""
        if online is not None:
            self.write("devices/system/cpu/online", online)
        for node, cpulist in (nodes or {}).items():
            self.write(f"devices/system/node/node{node}/cpulist", cpulist)
            if distances and node in distances:
                self.write(f"devices/system/node/node{node}/distance", distances[node])
        if nodes:
            self.write("devices/system/node/online", ",".join(str(n) for n in sorted(nodes)))

    # ---- PCI ---------------------------------------------------------------------------------

    def root_complex(self, domain: int, bus: int) -> str:
        """Create ``devices/pciDDDD:BB`` and return its name."""
        name = f"pci{domain:04x}:{bus:02x}"
        path = self.root / "devices" / name
        path.mkdir(parents=True, exist_ok=True)
        self.dirs[name] = path
        return name

    def pci(
        self,
        address: str,
        parent: str,
        *,
        vendor: int,
        device: int,
        class_code: int,
        numa_node: int | None = -1,
        local_cpulist: str | None = None,
    ) -> str:
        """Add the PCI function ``address`` below ``parent`` (a root complex or a bridge)."""
        path = self.dirs[parent] / address
        path.mkdir(parents=True)
        self.dirs[address] = path
        (path / "vendor").write_text(f"0x{vendor:04x}\n")
        (path / "device").write_text(f"0x{device:04x}\n")
        (path / "class").write_text(f"0x{class_code:06x}\n")
        if numa_node is not None:
            (path / "numa_node").write_text(f"{numa_node}\n")
        if local_cpulist is not None:
            (path / "local_cpulist").write_text(local_cpulist + "\n")
        self.link(self.root / "bus" / "pci" / "devices" / address, path)
        return address

    def bridge(
        self,
        address: str,
        parent: str,
        *,
        vendor: int = BROADCOM,
        device: int = 0xC030,
        numa_node: int | None = -1,
        local_cpulist: str | None = None,
    ) -> str:
        """Add a PCI-to-PCI bridge (root port or switch port)."""
        return self.pci(
            address,
            parent,
            vendor=vendor,
            device=device,
            class_code=BRIDGE_CLASS,
            numa_node=numa_node,
            local_cpulist=local_cpulist,
        )

    # ---- class/net, class/infiniband ---------------------------------------------------------

    def netdev(self, name: str, pci: str | None = None, *, via_child: str | None = None) -> None:
        """Add ``class/net/<name>``.

        With ``pci`` the interface lives in ``<pci dir>[/<via_child>]/net/<name>`` and gets a
        ``device`` link to ``<pci dir>[/<via_child>]`` (virtio NICs link to their ``virtioN``
        child); without, it is virtual (``devices/virtual/net/<name>``, no ``device`` link).
        """
        if pci is None:
            path = self.root / "devices" / "virtual" / "net" / name
            path.mkdir(parents=True)
        else:
            owner = self.dirs[pci] / via_child if via_child else self.dirs[pci]
            path = owner / "net" / name
            path.mkdir(parents=True)
            self.link(path / "device", owner)
        (path / "ifindex").write_text("1\n")
        self.link(self.root / "class" / "net" / name, path)

    def platform_netdev(self, name: str, device_rel: str) -> None:
        """Add a netdev whose ``device`` is a non-PCI device (``devices/platform/...``)."""
        owner = self.root / device_rel
        path = owner / "net" / name
        path.mkdir(parents=True)
        self.link(path / "device", owner)
        self.link(self.root / "class" / "net" / name, path)

    def ib(
        self,
        name: str,
        pci: str,
        ports: Mapping[int, str | None] | None = None,
        *,
        link_layer: str = "InfiniBand",
    ) -> None:
        """Add ``class/infiniband/<name>`` on ``pci`` with ``ports`` (port number -> rate)."""
        path = self.dirs[pci] / "infiniband" / name
        path.mkdir(parents=True)
        self.link(path / "device", self.dirs[pci])
        for port, rate in (ports or {}).items():
            pdir = path / "ports" / str(port)
            pdir.mkdir(parents=True)
            if rate is not None:
                (pdir / "rate").write_text(rate + "\n")
            (pdir / "link_layer").write_text(link_layer + "\n")
            (pdir / "state").write_text("4: ACTIVE\n")
        self.link(self.root / "class" / "infiniband" / name, path)


@dataclass
class FakeHost:
    """A built tree and what discovery should find in it."""

    root: Path
    gpus: list[str]
    """GPU PCI addresses, sorted."""
    pairs: dict[str, list[str]]
    """Expected ``pair_gpus_with_nics()`` result: GPU address -> NIC addresses."""
    gpu_numa: dict[str, int]
    """GPU address -> NUMA node (-1 unknown)."""
    worker_cpus: dict[str, list[int]]
    """Expected ``worker_cpus()`` per GPU."""
    nic_names: dict[str, str] = field(default_factory=dict)
    """NIC address -> expected :attr:`Nic.name`."""
    extra: dict[str, object] = field(default_factory=dict)


def _addr(bus: int, dev: int = 0, fn: int = 0, domain: int = 0) -> str:
    return f"{domain:04x}:{bus:02x}:{dev:02x}.{fn}"


def _cpus(spec: str, without_zero: bool = True) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return [c for c in sorted(out) if not (without_zero and c == 0)]


# ------------------------------------------------------------------------------------------------
# (a) DGX H100-like
# ------------------------------------------------------------------------------------------------

DGX_NODE_CPUS = {0: "0-55,112-167", 1: "56-111,168-223"}


def build_dgx_h100(root: Path) -> FakeHost:
    """Dual-socket 8-GPU, 8-NIC host like a DGX H100.

    Per socket two root complexes; each root port feeds a switch pair: a level-1 switch whose two
    downstream ports each lead to a level-2 switch holding one H100 and one ConnectX-7. So every
    GPU shares its level-2 switch with exactly one NIC, and the level-1 switch with one more GPU
    and NIC. Distractors: a storage ConnectX-7 (RoCE) and an Intel management NIC on socket 0's
    ``pci0000:00``, an ASPEED VGA, two NVSwitches, virtual ``lo`` and ``docker0``.
    """
    fs = FakeSysfs(root)
    fs.cpus("0-223", DGX_NODE_CPUS, {0: "10 21", 1: "21 10"})
    gpus: list[str] = []
    pairs: dict[str, list[str]] = {}
    gpu_numa: dict[str, int] = {}
    names: dict[str, str] = {}
    index = 0
    for socket, buses in ((0, (0x15, 0x37)), (1, (0x97, 0xB7))):
        cpus = DGX_NODE_CPUS[socket]
        kw = {"numa_node": socket, "local_cpulist": cpus}
        for b in buses:
            rc = fs.root_complex(0, b)
            rp = fs.bridge(_addr(b, 1), rc, vendor=INTEL, device=0x352A, **kw)
            usp1 = fs.bridge(_addr(b + 1), rp, **kw)
            for k in range(2):
                dsp1 = fs.bridge(_addr(b + 2, k), usp1, **kw)
                sub = b + 3 + 4 * k
                usp2 = fs.bridge(_addr(sub), dsp1, **kw)
                dsp_gpu = fs.bridge(_addr(sub + 1, 0), usp2, **kw)
                dsp_nic = fs.bridge(_addr(sub + 1, 1), usp2, **kw)
                gpu = fs.pci(
                    _addr(sub + 2),
                    dsp_gpu,
                    vendor=NVIDIA,
                    device=H100_SXM,
                    class_code=0x030200,
                    **kw,
                )
                nic = fs.pci(
                    _addr(sub + 3),
                    dsp_nic,
                    vendor=MELLANOX,
                    device=CONNECTX7,
                    class_code=0x020700,
                    **kw,
                )
                fs.netdev(f"ibp{sub + 3}s0", nic)
                fs.ib(f"mlx5_{index}", nic, {1: "400 Gb/sec (4X NDR)"})
                gpus.append(gpu)
                pairs[gpu] = [nic]
                gpu_numa[gpu] = socket
                names[nic] = f"mlx5_{index}"
                index += 1

    # Socket 0 platform devices on pci0000:00.
    kw0 = {"numa_node": 0, "local_cpulist": DGX_NODE_CPUS[0]}
    rc0 = fs.root_complex(0, 0)
    rp_storage = fs.bridge(_addr(0, 2), rc0, vendor=INTEL, device=0x352A, **kw0)
    storage = fs.pci(
        _addr(0x04), rp_storage, vendor=MELLANOX, device=CONNECTX7, class_code=0x020000, **kw0
    )
    fs.netdev("enp4s0np0", storage)
    fs.ib("mlx5_8", storage, {1: "200 Gb/sec (4X HDR)"}, link_layer="Ethernet")
    names[storage] = "mlx5_8"
    rp_mgmt = fs.bridge(_addr(0, 0x1C), rc0, vendor=INTEL, device=0x7AB8, **kw0)
    mgmt = fs.pci(_addr(0x01), rp_mgmt, vendor=INTEL, device=0x1563, class_code=0x020000, **kw0)
    fs.netdev("eno1", mgmt)
    names[mgmt] = "eno1"
    rp_bmc = fs.bridge(_addr(0, 0x1C, 4), rc0, vendor=INTEL, device=0x7ABC, **kw0)
    bmc_bridge = fs.bridge(_addr(0x02), rp_bmc, vendor=0x1A03, device=0x1150, **kw0)
    fs.pci(_addr(0x03), bmc_bridge, vendor=0x1A03, device=0x2000, class_code=0x030000, **kw0)

    # NVSwitches (NVIDIA, but class 0x0680: not GPUs) on socket 1.
    kw1 = {"numa_node": 1, "local_cpulist": DGX_NODE_CPUS[1]}
    rc1 = fs.root_complex(0, 0x80)
    for i in range(2):
        rp = fs.bridge(_addr(0x80, 1 + i), rc1, vendor=INTEL, device=0x352A, **kw1)
        fs.pci(_addr(0x81 + i), rp, vendor=NVIDIA, device=NVSWITCH, class_code=0x068000, **kw1)

    fs.netdev("lo")
    fs.netdev("docker0")
    worker = {g: _cpus(DGX_NODE_CPUS[gpu_numa[g]]) for g in gpus}
    return FakeHost(
        root=root,
        gpus=gpus,
        pairs=pairs,
        gpu_numa=gpu_numa,
        worker_cpus=worker,
        nic_names=names,
        extra={"storage_nic": storage, "mgmt_nic": mgmt},
    )


# ------------------------------------------------------------------------------------------------
# (b) AWS p5-like
# ------------------------------------------------------------------------------------------------

P5_NODE_CPUS = {0: "0-47,96-143", 1: "48-95,144-191"}


def build_aws_p5(root: Path) -> FakeHost:
    """An AWS p5.48xlarge-like host: 8 H100, 32 EFA, 2 NUMA nodes.

    Two root complexes per socket, two GPUs per root complex, each GPU on its own root port
    behind a switch that also holds 4 EFAs. The last EFA has no ``class/infiniband`` entry (no
    driver bound) and must still be found from its PCI ids. The ENA (``ens32``) sits directly on
    ``pci0000:00`` and is not RDMA-capable.
    """
    fs = FakeSysfs(root)
    fs.cpus("0-191", P5_NODE_CPUS, {0: "10 32", 1: "32 10"})
    gpus: list[str] = []
    pairs: dict[str, list[str]] = {}
    gpu_numa: dict[str, int] = {}
    names: dict[str, str] = {}
    all_efa: list[str] = []
    for socket, buses in ((0, (0x44, 0x66)), (1, (0x88, 0xAA))):
        kw = {"numa_node": socket, "local_cpulist": P5_NODE_CPUS[socket]}
        for b in buses:
            rc = fs.root_complex(0, b)
            for j in range(2):
                base = b + 1 + 8 * j
                rp = fs.bridge(_addr(b, 1 + j), rc, vendor=0x1022, device=0x1483, **kw)
                usp = fs.bridge(_addr(base), rp, **kw)
                dsps = [fs.bridge(_addr(base + 1, d), usp, **kw) for d in range(5)]
                gpu = fs.pci(
                    _addr(base + 2),
                    dsps[0],
                    vendor=NVIDIA,
                    device=H100_SXM,
                    class_code=0x030200,
                    **kw,
                )
                efas = []
                for m in range(4):
                    bus = base + 3 + m
                    efa = fs.pci(
                        _addr(bus),
                        dsps[1 + m],
                        vendor=AMAZON,
                        device=EFA_GEN2,
                        class_code=0x020000,
                        **kw,
                    )
                    efas.append(efa)
                    all_efa.append(efa)
                    names[efa] = f"rdmap{bus}s0"
                gpus.append(gpu)
                pairs[gpu] = efas
                gpu_numa[gpu] = socket
    no_driver = all_efa[-1]
    for efa in all_efa:
        if efa != no_driver:
            fs.ib(names[efa], efa, {1: "100 Gb/sec (4X EDR)"}, link_layer="Unspecified")
    names[no_driver] = no_driver

    kw0 = {"numa_node": 0, "local_cpulist": P5_NODE_CPUS[0]}
    rc0 = fs.root_complex(0, 0)
    ena = fs.pci(_addr(0, 5), rc0, vendor=AMAZON, device=ENA, class_code=0x020000, **kw0)
    fs.netdev("ens32", ena)
    names[ena] = "ens32"
    fs.netdev("lo")
    worker = {g: _cpus(P5_NODE_CPUS[gpu_numa[g]]) for g in gpus}
    return FakeHost(
        root=root,
        gpus=gpus,
        pairs=pairs,
        gpu_numa=gpu_numa,
        worker_cpus=worker,
        nic_names=names,
        extra={"ena": ena, "efa_without_driver": no_driver, "efas": all_efa},
    )


# ------------------------------------------------------------------------------------------------
# (c) Grace Hopper-like ARM host
# ------------------------------------------------------------------------------------------------


def build_grace_hopper(root: Path) -> FakeHost:
    """An ARM GH200-like host: CPUs 0-71 on node 0, node 1 memory-only (the GPU's HBM).

    GPU on ``pci0009:00``, a dual-function ConnectX-7 on ``pci0000:00`` reporting
    ``numa_node`` = -1, a BMC USB netdev on a platform (non-PCI) device. No x86 files.
    """
    fs = FakeSysfs(root)
    fs.cpus("0-71", {0: "0-71", 1: ""}, {0: "10 80", 1: "80 10"})
    rc9 = fs.root_complex(9, 0)
    rp9 = fs.bridge(_addr(0, domain=9), rc9, vendor=NVIDIA, device=0x22B2, numa_node=0)
    gpu = fs.pci(
        _addr(1, domain=9),
        rp9,
        vendor=NVIDIA,
        device=GH100_GH200,
        class_code=0x030200,
        numa_node=0,
        local_cpulist="0-71",
    )
    rc0 = fs.root_complex(0, 0)
    rp0 = fs.bridge(_addr(0), rc0, vendor=NVIDIA, device=0x22B2, numa_node=-1)
    nics = []
    for fn in range(2):
        nic = fs.pci(
            _addr(1, 0, fn),
            rp0,
            vendor=MELLANOX,
            device=CONNECTX7,
            class_code=0x020000,
            numa_node=-1,
            local_cpulist="0-71",
        )
        fs.netdev(f"enP1s0f{fn}np{fn}", nic)
        fs.ib(f"mlx5_{fn}", nic, {1: "400 Gb/sec (4X NDR)"}, link_layer="Ethernet")
        nics.append(nic)
    fs.platform_netdev("usb0", "devices/platform/soc/3610000.usb/usb1/1-1/1-1:1.0")
    fs.netdev("lo")
    return FakeHost(
        root=root,
        gpus=[gpu],
        pairs={gpu: nics},
        gpu_numa={gpu: 0},
        worker_cpus={gpu: list(range(1, 72))},
        nic_names={nics[0]: "mlx5_0", nics[1]: "mlx5_1"},
    )


# ------------------------------------------------------------------------------------------------
# (d) cloud VM with unknown NUMA
# ------------------------------------------------------------------------------------------------


def build_cloud_vm(root: Path) -> FakeHost:
    """A single-GPU VM: every ``numa_node`` is -1 and there is no ``devices/system/node``.

    The GPU (with an NVIDIA audio function that is not a GPU) and a virtio NIC sit directly on
    ``pci0000:00``; ``eth0``'s ``device`` link points at ``virtio1`` below the PCI function.
    """
    fs = FakeSysfs(root)
    fs.cpus("0-7")
    rc = fs.root_complex(0, 0)
    kw = {"numa_node": -1, "local_cpulist": "0-7"}
    gpu = fs.pci(_addr(0, 0x1E), rc, vendor=NVIDIA, device=A10G, class_code=0x030200, **kw)
    fs.pci(_addr(0, 0x1E, 1), rc, vendor=NVIDIA, device=0x1AEF, class_code=0x040300, **kw)
    nic = fs.pci(_addr(0, 5), rc, vendor=0x1AF4, device=0x1041, class_code=0x020000, **kw)
    (fs.dirs[nic] / "virtio1").mkdir()
    fs.netdev("eth0", nic, via_child="virtio1")
    for name in ("lo", "docker0", "veth1a2b3c"):
        fs.netdev(name)
    return FakeHost(
        root=root,
        gpus=[gpu],
        pairs={gpu: [nic]},
        gpu_numa={gpu: -1},
        worker_cpus={gpu: list(range(1, 8))},
        nic_names={nic: "eth0"},
    )


BUILDERS = {
    "dgx_h100": build_dgx_h100,
    "aws_p5": build_aws_p5,
    "grace_hopper": build_grace_hopper,
    "cloud_vm": build_cloud_vm,
}


def flat_host(
    root: Path,
    *,
    gpus_per_switch: Sequence[int],
    nics_per_switch: Sequence[int],
    numa_node: int = 0,
) -> FakeSysfs:
    """A small single-node host with one root complex and one switch per entry.

    Switch ``i`` holds ``gpus_per_switch[i]`` GPUs and ``nics_per_switch[i]`` RDMA NICs (named
    ``mlx5_<n>``). Entries with ``0`` GPUs and NICs are skipped.
    """
    fs = FakeSysfs(root)
    cpus = "0-15"
    fs.cpus(cpus, {numa_node: cpus} if numa_node >= 0 else None)
    rc = fs.root_complex(0, 0)
    kw = {"numa_node": numa_node, "local_cpulist": cpus}
    bus = 1
    nic_index = 0
    for i, (ng, nn) in enumerate(zip(gpus_per_switch, nics_per_switch, strict=True)):
        rp = fs.bridge(_addr(0, 1 + i), rc, vendor=INTEL, device=0x352A, **kw)
        usp = fs.bridge(_addr(bus), rp, **kw)
        dsp_bus = bus + 1
        bus += 2
        for d in range(ng + nn):
            dsp = fs.bridge(_addr(dsp_bus, d), usp, **kw)
            if d < ng:
                fs.pci(_addr(bus), dsp, vendor=NVIDIA, device=H100_SXM, class_code=0x030200, **kw)
            else:
                nic = fs.pci(
                    _addr(bus), dsp, vendor=MELLANOX, device=CONNECTX7, class_code=0x020700, **kw
                )
                fs.ib(f"mlx5_{nic_index}", nic, {1: "400 Gb/sec (4X NDR)"})
                nic_index += 1
            bus += 1
    return fs
