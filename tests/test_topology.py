"""Tests for ``stolon.topology`` on fake sysfs trees (see ``fixtures_sysfs.py``) and on ``/sys``.

The module is loaded from its file, under a stand-in package, so these tests do not need the
native extension built.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_sysfs as fx

_STOLON_DIR = Path(__file__).resolve().parents[1] / "python" / "stolon"


def _load_topology() -> ModuleType:
    # A stand-in for the package, so topology.py's imports of its sibling modules resolve
    # without running stolon/__init__.py (which loads the native extension).
    package = "_stolon_under_test"
    name = f"{package}.topology"
    if name in sys.modules:
        return sys.modules[name]
    if package not in sys.modules:
        stand_in = ModuleType(package)
        stand_in.__path__ = [str(_STOLON_DIR)]
        sys.modules[package] = stand_in
    return importlib.import_module(name)


topo = _load_topology()

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _addresses(pairs: dict[str, list]) -> dict[str, list[str]]:
    return {g: [n.address for n in nics] for g, nics in pairs.items()}


def _assert_no_needless_sharing(t, pairs: dict[str, list]) -> None:
    """No NIC is assigned to two GPUs while an unassigned, at-most-as-near NIC exists."""
    load = Counter(n.address for nics in pairs.values() for n in nics)
    candidates = [n for n in t.nics if n.rdma_capable] or list(t.nics)
    idle = [n for n in candidates if load[n.address] == 0]
    for gaddr, nics in pairs.items():
        g = t.gpu(gaddr)
        for n in nics:
            if load[n.address] > 1:
                d = topo.distance(g, n)
                assert not [m for m in idle if topo.distance(g, m) <= d], (gaddr, n.address)


@pytest.fixture(params=sorted(fx.BUILDERS))
def host(request: pytest.FixtureRequest, tmp_path: Path) -> fx.FakeHost:
    return fx.BUILDERS[request.param](tmp_path / "sys")


# ------------------------------------------------------------------------------------------------
# all fake hosts
# ------------------------------------------------------------------------------------------------


def test_fake_hosts_exact_outcomes(host: fx.FakeHost) -> None:
    t = topo.discover(host.root)
    assert [g.address for g in t.gpus] == host.gpus
    assert {g.address: g.numa_node for g in t.gpus} == host.gpu_numa
    pairs = t.pair_gpus_with_nics()
    assert _addresses(pairs) == host.pairs
    for gaddr, cpus in host.worker_cpus.items():
        assert t.worker_cpus(gaddr) == cpus
    for naddr, name in host.nic_names.items():
        assert t.nic(naddr).name == name
    _assert_no_needless_sharing(t, pairs)


def test_fake_hosts_deterministic_and_serialisable(host: fx.FakeHost) -> None:
    a, b = topo.discover(host.root), topo.discover(str(host.root))
    assert a == b
    assert _addresses(a.pair_gpus_with_nics()) == _addresses(b.pair_gpus_with_nics())
    d = a.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert [g["nics"] for g in d["gpus"]] == [host.pairs[g] for g in host.gpus]
    table = a.format_table()
    for gaddr in host.gpus:
        assert gaddr in table
    assert "NODE" in table or "NUMA nodes: none" in table


# ------------------------------------------------------------------------------------------------
# (a) DGX H100-like
# ------------------------------------------------------------------------------------------------


def test_dgx_each_gpu_gets_the_nic_behind_its_switch(tmp_path: Path) -> None:
    host = fx.build_dgx_h100(tmp_path / "sys")
    t = topo.discover(host.root)
    assert len(t.gpus) == 8
    assert t.cpu_count == 224
    assert [n.id for n in t.numa_nodes] == [0, 1]
    assert t.numa_nodes[1].distances == (21, 10)
    # 8 compute NICs + storage + management; NVSwitches, BMC VGA, lo and docker0 excluded.
    assert len(t.nics) == 10
    assert t.nic("eno1").kind == "ethernet" and not t.nic("eno1").rdma_capable
    assert t.nic("mlx5_8").ports[0].link_layer == "Ethernet"

    pairs = t.pair_gpus_with_nics()
    assert {g: [n.name for n in nics] for g, nics in pairs.items()} == {
        "0000:1a:00.0": ["mlx5_0"],
        "0000:1e:00.0": ["mlx5_1"],
        "0000:3c:00.0": ["mlx5_2"],
        "0000:40:00.0": ["mlx5_3"],
        "0000:9c:00.0": ["mlx5_4"],
        "0000:a0:00.0": ["mlx5_5"],
        "0000:bc:00.0": ["mlx5_6"],
        "0000:c0:00.0": ["mlx5_7"],
    }
    # A bigger max does not pull in the neighbour's NIC; a max of 1 gives the same.
    assert _addresses(t.pair_gpus_with_nics(1)) == _addresses(pairs)
    assert _addresses(t.pair_gpus_with_nics(8)) == _addresses(pairs)

    nic0 = t.nic("mlx5_0")
    assert nic0.netdevs == ("ibp27s0",) and nic0.rdma_devices == ("mlx5_0",)
    assert nic0.ports[0].rate == "400 Gb/sec (4X NDR)" and nic0.rate_gbps == 400.0
    assert nic0.bridges == (
        "0000:15:01.0",
        "0000:16:00.0",
        "0000:17:00.0",
        "0000:18:00.0",
        "0000:19:01.0",
    )
    assert nic0.root_complex == "pci0000:15"

    g0 = t.gpu(0)
    assert t.gpu("00000000:1A:00.0") is g0 and t.gpu("1a:00.0") is g0
    assert t.proximity(g0, "mlx5_0") is topo.Proximity.PCIE_SWITCH
    assert t.proximity(g0, "mlx5_1") is topo.Proximity.PCIE_SWITCH
    assert t.distance(g0, "mlx5_0") < t.distance(g0, "mlx5_1")
    assert t.proximity(g0, "mlx5_2") is topo.Proximity.NUMA_NODE
    assert t.proximity(g0, "mlx5_8") is topo.Proximity.NUMA_NODE
    assert t.proximity(g0, "mlx5_4") is topo.Proximity.CROSS_NUMA
    assert t.distance(g0, "mlx5_1") < t.distance(g0, "mlx5_2") < t.distance(g0, "mlx5_4")

    assert t.worker_cpus("0000:1a:00.0") == [*range(1, 56), *range(112, 168)]
    assert t.worker_cpus("0000:c0:00.0") == [*range(56, 112), *range(168, 224)]
    assert t.worker_cpus(0, allowed=[0, 1, 2, 100]) == [1, 2]
    assert t.worker_cpus(0, allowed=[100]) == [*range(1, 56), *range(112, 168)]


def test_dgx_without_rdma_preference_still_pairs_switch_nics(tmp_path: Path) -> None:
    host = fx.build_dgx_h100(tmp_path / "sys")
    t = topo.discover(host.root)
    assert _addresses(t.pair_gpus_with_nics(prefer_rdma=False)) == host.pairs


# ------------------------------------------------------------------------------------------------
# (b) AWS p5-like
# ------------------------------------------------------------------------------------------------


def test_p5_each_gpu_gets_its_four_efa(tmp_path: Path) -> None:
    host = fx.build_aws_p5(tmp_path / "sys")
    t = topo.discover(host.root)
    assert len(t.gpus) == 8
    efas = [n for n in t.nics if n.is_efa]
    assert len(efas) == 32 and all(n.kind == "efa" and n.rdma_capable for n in efas)
    assert len(t.nics) == 33  # + ENA
    assert t.nic(str(host.extra["ena"])).kind == "ethernet"
    bare = t.nic(str(host.extra["efa_without_driver"]))
    assert bare.is_efa and bare.rdma_devices == () and bare.netdevs == ()

    pairs = t.pair_gpus_with_nics()
    assert _addresses(pairs) == host.pairs
    assert all(len(v) == 4 for v in pairs.values())
    assert Counter(n.address for v in pairs.values() for n in v) == Counter(
        {a: 1 for a in host.extra["efas"]}
    )
    assert [n.name for n in pairs["0000:47:00.0"]] == [
        "rdmap72s0",
        "rdmap73s0",
        "rdmap74s0",
        "rdmap75s0",
    ]
    # Fewer per GPU: the lowest-addressed of its own 4, still never a neighbour's.
    two = _addresses(t.pair_gpus_with_nics(2))
    assert two == {g: nics[:2] for g, nics in host.pairs.items()}
    # Workers of socket-1 GPUs run on socket 1, never on CPU 0.
    for g in t.gpus:
        cpus = t.worker_cpus(g)
        assert cpus == host.worker_cpus[g.address]
        assert set(cpus) <= set(t.numa_node(g.numa_node).cpus) and 0 not in cpus
    assert t.nic("rdmap72s0").rate_gbps == 100.0


# ------------------------------------------------------------------------------------------------
# (c) ARM / Grace Hopper-like and (d) VM with numa_node == -1
# ------------------------------------------------------------------------------------------------


def test_grace_hopper(tmp_path: Path) -> None:
    host = fx.build_grace_hopper(tmp_path / "sys")
    t = topo.discover(host.root)
    assert t.online_cpus == tuple(range(72))
    assert [(n.id, len(n.cpus)) for n in t.numa_nodes] == [(0, 72), (1, 0)]
    (g,) = t.gpus
    assert g.address == "0009:01:00.0" and g.root_complex == "pci0009:00"
    assert [n.name for n in t.nics] == ["mlx5_0", "mlx5_1"]  # usb0 (platform device) skipped
    assert all(n.numa_node == -1 for n in t.nics)
    assert t.proximity(g, "mlx5_0") is topo.Proximity.UNKNOWN_NUMA
    assert [n.name for n in t.pair_gpus_with_nics()[g.address]] == ["mlx5_0", "mlx5_1"]
    assert [n.name for n in t.pair_gpus_with_nics(1)[g.address]] == ["mlx5_0"]
    assert t.worker_cpus(g) == list(range(1, 72))


def test_cloud_vm_unknown_numa(tmp_path: Path) -> None:
    host = fx.build_cloud_vm(tmp_path / "sys")
    t = topo.discover(host.root)
    assert t.numa_nodes == ()
    (g,) = t.gpus  # the NVIDIA audio function is not a GPU
    assert g.numa_node == -1
    (nic,) = t.nics  # lo, docker0, veth are virtual
    assert nic.netdevs == ("eth0",) and nic.address == "0000:00:05.0" and nic.kind == "ethernet"
    assert t.proximity(g, nic) is topo.Proximity.ROOT_COMPLEX
    assert t.worker_cpus(g) == list(range(1, 8))


def test_numa_minus_one_uses_all_online_cpus(tmp_path: Path) -> None:
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[1], nics_per_switch=[1], numa_node=-1)
    fs.write("devices/system/cpu/online", "0-3,5-7")  # CPU 4 offline
    t = topo.discover(fs.root)
    assert t.worker_cpus(0) == [1, 2, 3, 5, 6, 7]


def test_worker_cpus_keeps_cpu0_when_it_is_the_only_one(tmp_path: Path) -> None:
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[1], nics_per_switch=[0])
    fs.write("devices/system/cpu/online", "0")
    fs.write("devices/system/node/node0/cpulist", "0")
    t = topo.discover(fs.root)
    assert t.worker_cpus(0) == [0]
    assert t.pair_gpus_with_nics() == {t.gpus[0].address: []}


def test_worker_cpus_falls_back_to_local_cpulist(tmp_path: Path) -> None:
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[1], nics_per_switch=[0], numa_node=3)
    shutil.rmtree(fs.root / "devices" / "system" / "node")
    t = topo.discover(fs.root)
    assert t.numa_nodes == () and t.worker_cpus(0) == list(range(1, 16))


# ------------------------------------------------------------------------------------------------
# balancing
# ------------------------------------------------------------------------------------------------


def test_two_gpus_sharing_a_switch_with_two_nics_get_one_each(tmp_path: Path) -> None:
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[2], nics_per_switch=[2])
    t = topo.discover(fs.root)
    pairs = t.pair_gpus_with_nics()
    assert [[n.name for n in v] for v in pairs.values()] == [["mlx5_0"], ["mlx5_1"]]
    _assert_no_needless_sharing(t, pairs)


def test_one_gpu_with_many_equal_nics_is_capped(tmp_path: Path) -> None:
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[1], nics_per_switch=[6])
    t = topo.discover(fs.root)
    (nics,) = t.pair_gpus_with_nics().values()
    assert [n.name for n in nics] == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    (nics,) = t.pair_gpus_with_nics(max_nics_per_gpu=6).values()
    assert len(nics) == 6
    with pytest.raises(ValueError):
        t.pair_gpus_with_nics(0)


def test_more_gpus_than_nics_is_balanced(tmp_path: Path) -> None:
    # Four single-GPU switches and two single-NIC switches on one root complex.
    fs = fx.flat_host(
        tmp_path / "sys", gpus_per_switch=[1, 1, 1, 1, 0, 0], nics_per_switch=[0, 0, 0, 0, 1, 1]
    )
    t = topo.discover(fs.root)
    pairs = t.pair_gpus_with_nics()
    assert [[n.name for n in v] for v in pairs.values()] == [
        ["mlx5_0"],
        ["mlx5_1"],
        ["mlx5_0"],
        ["mlx5_1"],
    ]
    assert all(t.proximity(g, v[0]) is topo.Proximity.ROOT_COMPLEX for g, v in pairs.items())


def test_gpu_without_own_nic_shares_its_nearest(tmp_path: Path) -> None:
    # Switch 0: GPU + NIC; switch 1: GPU alone; switch 2: GPU + NIC. The lone GPU shares one.
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[1, 1, 1], nics_per_switch=[1, 0, 1])
    t = topo.discover(fs.root)
    pairs = t.pair_gpus_with_nics()
    names = [[n.name for n in v] for v in pairs.values()]
    assert names == [["mlx5_0"], ["mlx5_0"], ["mlx5_1"]]
    _assert_no_needless_sharing(t, pairs)


# ------------------------------------------------------------------------------------------------
# robustness
# ------------------------------------------------------------------------------------------------


def test_missing_root_gives_empty_topology(tmp_path: Path) -> None:
    t = topo.discover(tmp_path / "does-not-exist")
    assert (t.online_cpus, t.numa_nodes, t.gpus, t.nics) == ((), (), (), ())
    assert t.pair_gpus_with_nics() == {}
    assert json.dumps(t.to_dict())
    assert "GPUs: none" in t.format_table() and "NICs: none" in t.format_table()


def test_partial_and_garbage_files_do_not_raise(tmp_path: Path) -> None:
    fs = fx.flat_host(tmp_path / "sys", gpus_per_switch=[1], nics_per_switch=[1])
    gpu_dir = fs.dirs["0000:03:00.0"]
    (gpu_dir / "numa_node").write_text("garbage\n")
    (gpu_dir / "local_cpulist").write_text("1-x\n")
    fs.write("devices/system/cpu/online", "nonsense")
    (fs.root / "bus" / "pci" / "devices" / "0000:99:00.0").symlink_to("../../../devices/nowhere")
    (fs.root / "bus" / "pci" / "devices" / "README").write_text("not a device\n")
    fs.link(fs.root / "class" / "infiniband" / "dangling", fs.root / "devices" / "gone")
    t = topo.discover(fs.root)
    (g,) = t.gpus
    assert g.numa_node == -1 and g.local_cpus == ()
    assert t.online_cpus == tuple(range(16))  # falls back to the NUMA node's CPUs
    assert [n.name for n in t.nics] == ["mlx5_0"]


def test_online_falls_back_to_cpu_directories(tmp_path: Path) -> None:
    fs = fx.FakeSysfs(tmp_path / "sys")
    for cpu, online in ((0, None), (1, "1"), (2, "0"), (3, "1")):
        (fs.root / f"devices/system/cpu/cpu{cpu}").mkdir(parents=True)
        if online is not None:
            fs.write(f"devices/system/cpu/cpu{cpu}/online", online)
    assert topo.discover(fs.root).online_cpus == (0, 1, 3)


def test_vmd_and_five_digit_domains(tmp_path: Path) -> None:
    fs = fx.FakeSysfs(tmp_path / "sys")
    fs.cpus("0-3", {0: "0-3"})
    rc = fs.root_complex(0, 0)
    vmd = fs.bridge("0000:00:0e.0", rc, numa_node=0)
    inner = fs.root_complex(0x10000, 0xE0)
    fs.dirs[inner] = fs.dirs[vmd] / inner
    fs.dirs[inner].mkdir()
    rp = fs.bridge("10000:e0:1d.0", inner, numa_node=0)
    nic = fs.pci("10000:e1:00.0", rp, vendor=fx.MELLANOX, device=fx.CONNECTX7, class_code=0x020000)
    fs.ib("mlx5_0", nic)
    t = topo.discover(fs.root)
    (n,) = t.nics
    assert n.address == "10000:e1:00.0"
    assert n.root_complex == "pci0000:00"
    assert n.bridges == ("0000:00:0e.0", "10000:e0:1d.0")


# ------------------------------------------------------------------------------------------------
# cpulists and addresses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", []),
        ("\n", []),
        ("0", [0]),
        ("0-0", [0]),
        ("0-3,8-11,16", [0, 1, 2, 3, 8, 9, 10, 11, 16]),
        (" 0-3,8-11,16\n", [0, 1, 2, 3, 8, 9, 10, 11, 16]),
        ("16,0-3", [0, 1, 2, 3, 16]),
        ("0-3,2-5", [0, 1, 2, 3, 4, 5]),
        ("1,,3,", [1, 3]),
        ("0-7:2/4", [0, 1, 4, 5]),
        ("0-55,112-167", [*range(56), *range(112, 168)]),
    ],
)
def test_parse_cpulist(text: str, expected: list[int]) -> None:
    assert topo.parse_cpulist(text) == expected


@pytest.mark.parametrize(
    "text", ["a", "3-1", "-1", "1-", "1-2-3", "0x1", "1.5", "0-3:0/4", "0-3:2"]
)
def test_parse_cpulist_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        topo.parse_cpulist(text)


def test_format_cpulist() -> None:
    assert topo.format_cpulist([]) == ""
    assert topo.format_cpulist([3, 0, 1, 2, 8, 8]) == "0-3,8"
    assert topo.format_cpulist([0, 2, 4]) == "0,2,4"


def test_parse_cpumask() -> None:
    assert topo.parse_cpumask("") == []
    assert topo.parse_cpumask("0000000f") == [0, 1, 2, 3]
    assert topo.parse_cpumask("00000001,00000000") == [32]
    with pytest.raises(ValueError):
        topo.parse_cpumask("xyz")


def test_normalize_pci_address() -> None:
    assert topo.normalize_pci_address("00000000:1A:00.0") == "0000:1a:00.0"
    assert topo.normalize_pci_address("1a:00.0") == "0000:1a:00.0"
    assert topo.normalize_pci_address("10000:e1:00.0") == "10000:e1:00.0"
    with pytest.raises(ValueError):
        topo.normalize_pci_address("mlx5_0")


if given is not None:

    @settings(max_examples=200, deadline=None)
    @given(st.sets(st.integers(min_value=0, max_value=4096), max_size=64))
    def test_cpulist_round_trip(cpus: set[int]) -> None:
        text = topo.format_cpulist(cpus)
        assert topo.parse_cpulist(text) == sorted(cpus)
        assert topo.parse_cpulist(text + "\n") == sorted(cpus)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 512), st.integers(0, 16)), min_size=0, max_size=12),
        st.randoms(use_true_random=False),
    )
    def test_cpulist_unordered_overlapping_ranges(
        ranges: list[tuple[int, int]], rnd: object
    ) -> None:
        items = [f"{lo}-{lo + n}" if n else str(lo) for lo, n in ranges]
        rnd.shuffle(items)  # type: ignore[attr-defined]
        expected = sorted({c for lo, n in ranges for c in range(lo, lo + n + 1)})
        assert topo.parse_cpulist(",".join(items)) == expected

    @st.composite
    def _random_topology(draw: st.DrawFn) -> object:
        """Random in-memory PCI trees: devices hang off random switch paths."""
        n_rc = draw(st.integers(1, 3))
        rc_numa = [draw(st.sampled_from([-1, 0, 0, 1])) for _ in range(n_rc)]
        devices = []
        count = draw(st.integers(2, 14))
        for i in range(count):
            rc = draw(st.integers(0, n_rc - 1))
            depth = draw(st.integers(0, 4))
            path = [draw(st.integers(0, 2)) for _ in range(depth)]
            bridges = tuple("/".join(map(str, [rc, *path[: k + 1]])) for k in range(depth))
            is_gpu = draw(st.booleans())
            common = {
                "address": f"0000:{i + 1:02x}:00.0",
                "vendor": fx.NVIDIA if is_gpu else fx.MELLANOX,
                "device": 0,
                "class_code": 0x030200 if is_gpu else 0x020700,
                "numa_node": rc_numa[rc],
                "local_cpus": (),
                "root_complex": f"pci0000:{rc:02x}",
                "bridges": bridges,
                "sysfs_path": "",
            }
            if is_gpu:
                devices.append(topo.Gpu(**common))
            else:
                devices.append(topo.Nic(**common, rdma_devices=(f"mlx5_{i}",)))
        return topo.Topology(
            sysfs_root="<memory>",
            online_cpus=(0, 1),
            gpus=tuple(d for d in devices if isinstance(d, topo.Gpu)),
            nics=tuple(d for d in devices if isinstance(d, topo.Nic)),
        )

    @settings(max_examples=300, deadline=None)
    @given(_random_topology(), st.integers(1, 4))
    def test_pairing_invariants(t: object, k: int) -> None:
        pairs = t.pair_gpus_with_nics(k)  # type: ignore[attr-defined]
        assert list(pairs) == [g.address for g in t.gpus]  # type: ignore[attr-defined]
        all_nics = t.nics  # type: ignore[attr-defined]
        for gaddr, nics in pairs.items():
            assert (1 <= len(nics) <= k) if all_nics else nics == []
            assert len({n.address for n in nics}) == len(nics)
            g = t.gpu(gaddr)  # type: ignore[attr-defined]
            # Every NIC a GPU gets is in that GPU's best proximity category.
            if all_nics:
                best = min(topo.proximity(g, n) for n in all_nics)
                assert {topo.proximity(g, n) for n in nics} == {best}
        _assert_no_needless_sharing(t, pairs)
        again = t.pair_gpus_with_nics(k)  # type: ignore[attr-defined]
        assert _addresses(again) == _addresses(pairs)


# ------------------------------------------------------------------------------------------------
# the real machine
# ------------------------------------------------------------------------------------------------


def test_real_sysfs_smoke() -> None:
    t = topo.discover()
    if os.path.isdir("/sys/devices/system/cpu"):
        assert t.cpu_count == os.cpu_count()
    t.pair_gpus_with_nics()
    for g in t.gpus:
        assert t.worker_cpus(g)
    json.dumps(t.to_dict())
    assert t.format_table()


def test_main_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    host = fx.build_cloud_vm(tmp_path / "sys")
    assert topo.main(["--sysfs", str(host.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpus"][0]["nic_names"] == ["eth0"]
    assert topo.main(["--sysfs", str(host.root)]) == 0
    assert "0000:00:1e.0" in capsys.readouterr().out
