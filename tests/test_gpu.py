"""GPU memory over the engine: NVLink (CUDA IPC) between processes and staging over tcp.

Needs torch with CUDA and NVIDIA GPUs (two for the NVLink cases); skipped elsewhere with the
reason. Run on a GPU machine: `pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

torch = pytest.importorskip("torch", reason="torch is not installed (GPU tests need torch)")

import stolon  # noqa: E402

pytestmark = pytest.mark.gpu

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(NGPU < 1, reason="needs an NVIDIA GPU (none visible)")
needs_two = pytest.mark.skipif(NGPU < 2, reason="needs two NVIDIA GPUs for NVLink")
MiB = 1 << 20


def _roles():
    import gpu_roles

    return gpu_roles


def _random_ops(rng: random.Random, size: int, n: int):
    """Disjoint destination stripes, random sources and lengths: (kind, ...) tuples."""
    stripe = size // n
    ops = []
    for k in range(n):
        base = k * stripe
        kind = rng.choice(["single", "single", "paged", "scatter"])
        if kind == "single":
            ln = rng.choice([0, 1, 100, 4096, rng.randrange(1, stripe)])
            ops.append(("single", rng.randrange(0, size - ln + 1), base, ln))
        elif kind == "paged":
            page = rng.choice([512, 4096, 16384])
            per = max(1, stripe // page)
            dpages = rng.sample(range(per), min(per, rng.randint(1, 6)))
            spages = [rng.randrange(0, size // page) for _ in dpages]
            ops.append(("paged", page, spages, dpages, base))
        else:
            items = []
            slot = stripe // 3
            for j in range(3):
                ln = rng.randrange(0, slot)
                items.append((rng.randrange(0, size - ln + 1), base + j * slot, ln))
            ops.append(("scatter", items))
    return ops


def _run_ops(eng, src_region, desc, ops, imm, expected, src_cpu):
    futs = []
    for op in ops:
        if op[0] == "single":
            _, s, d, ln = op
            futs.append(eng.write(src_region, s, desc, d, ln, imm=imm))
            expected[d : d + ln] = src_cpu[s : s + ln]
        elif op[0] == "paged":
            _, page, sp, dp, base = op
            futs.append(eng.write_paged(src_region, desc, page, sp, dp, dst_offset=base, imm=imm))
            for a, b in zip(sp, dp):
                expected[base + b * page : base + (b + 1) * page] = src_cpu[
                    a * page : (a + 1) * page
                ]
        else:
            items = [(desc, s, d, ln) for (s, d, ln) in op[1]]
            futs.append(eng.scatter(src_region, items, imm=imm))
            for s, d, ln in op[1]:
                expected[d : d + ln] = src_cpu[s : s + ln]
    for f in futs:
        f.wait(60)
    return sum(f.imm_count for f in futs)


def _exchange(
    nvlink: bool,
    src_dev: int,
    dst_dev: int,
    seed: int,
    src_host: bool = False,
    dst_host: bool = False,
    alloc_conf: str = "",
    after=None,
):
    roles = _roles()
    size = 16 * MiB
    rx = roles.Remote({"device": dst_dev, "size": size, "nvlink": nvlink, "alloc_conf": alloc_conf})
    try:
        torch.cuda.set_device(src_dev)
        eng = roles.engine(src_dev, nvlink)
        with eng:
            g = torch.Generator(device=f"cuda:{src_dev}").manual_seed(seed)
            src = torch.randint(
                0, 256, (size,), dtype=torch.uint8, device=f"cuda:{src_dev}", generator=g
            )
            src_cpu = src.cpu()
            region = eng.register(src_cpu.numpy() if src_host else src)
            desc = rx.host_desc if dst_host else rx.gpu_desc
            path = eng.path(region, desc)
            expected = torch.zeros(size, dtype=torch.uint8)
            ops = _random_ops(random.Random(seed), size, 12)
            total = _run_ops(eng, region, desc, ops, 5, expected, src_cpu)
            rx.expect(5, total)
            rx.result()
            assert rx.call("count", 5) == 0, "more immediates than the transfers promised"
            got = rx.call("sha", 0, size, "host" if dst_host else "gpu")
            import hashlib

            assert got == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
            if after is not None:
                after(eng, region, desc, rx)
            return path
    finally:
        rx.close()


@needs_two
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_nvlink_writes_are_byte_exact(seed: int) -> None:
    assert _exchange(True, 0, 1, seed) == "nvlink"


@needs_gpu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [3])
def test_staged_tcp_gpu_to_gpu_is_byte_exact(seed: int) -> None:
    assert _exchange(False, 0, min(1, NGPU - 1), seed) == "staged"


@needs_gpu
@pytest.mark.timeout(300)
def test_staged_gpu_to_host_and_host_to_gpu() -> None:
    dst = min(1, NGPU - 1)
    assert _exchange(False, 0, dst, 4, dst_host=True) == "staged"
    assert _exchange(False, 0, dst, 5, src_host=True) == "staged"


@needs_two
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [6, 7])
def test_expandable_segments_memory_moves_over_nvlink(seed: int) -> None:
    # The receiver's allocator uses expandable segments: CUDA VMM memory, which has no CUDA IPC
    # handle. Its engine exports the allocations as file descriptors over its Unix socket, the
    # writer maps them and copies over NVLink (not staging), byte-exact. Unregistering ends the
    # writer's lease: its later writes fail instead of landing.
    seen = {}

    def after(eng, region, desc, rx) -> None:
        seen["rx_info"] = rx.info
        seen["nvlink_stats"] = eng.nvlink_stats()
        rx.call("unregister")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                eng.write(region, 0, desc, 0, 4096).wait(10)
            except stolon.errors.StolonError as e:
                seen["after_unregister"] = f"{type(e).__name__}: {e}"
                return
            time.sleep(0.02)

    path = _exchange(True, 0, 1, seed, alloc_conf="expandable_segments:True", after=after)
    rx_info = seen["rx_info"]
    assert rx_info.get("vmm"), f"the receiver's tensor is not in an expandable segment: {rx_info}"
    assert path == "nvlink", f"took {path!r}; owner's note: {rx_info.get('nvlink_note')}"
    assert rx_info.get("nvlink_note") is None, rx_info
    assert seen["nvlink_stats"]["write_ops"] > 0, seen
    assert "after_unregister" in seen, "writes still succeeded 10 s after the owner unregistered"


@needs_two
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["host", "gdr"])
def test_completion_flag_gates_gpu_work_without_a_cpu_launch(kind: str) -> None:
    """A stream waits on a completion flag the engine sets when the data landed: a host-mapped
    HostCounter, or a GpuFlag in GPU memory written through GDRCopy (where it is installed)."""
    if kind == "gdr" and not stolon.GpuFlag.available():
        pytest.skip("GDRCopy is not installed here (libgdrapi and the gdrdrv module)")
    roles = _roles()
    size = 8 * MiB
    rx = roles.Remote({"device": 1, "size": size, "nvlink": True})
    try:
        torch.cuda.set_device(0)
        with roles.engine(0, True) as eng:
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
            region = eng.register(src)
            n = eng.imm_count_for(region, rx.gpu_desc, size)
            rx.conn.send(("gated_copy", 9, n, size, kind))
            assert rx.result() is None  # the gated copy is queued; nothing has been written
            time.sleep(0.2)
            eng.write(region, 0, rx.gpu_desc, 0, size, imm=9).wait(30)
            digest, flag = rx.result()
            assert flag == 1
            import hashlib

            assert digest == hashlib.sha256(src.cpu().numpy().tobytes()).hexdigest()
    finally:
        rx.close()


@needs_gpu
@pytest.mark.timeout(120)
def test_watcher_sees_stream_writes_and_releases_steps() -> None:
    torch.cuda.set_device(0)
    with (
        stolon.TransferEngine("tcp", 1, nodes=["127.0.0.1"], cuda_device=0) as a,
        stolon.TransferEngine("tcp", 1, nodes=["127.0.0.1"], cuda_device=0) as b,
    ):
        src = torch.arange(4096, dtype=torch.int32, device="cuda:0").view(torch.uint8)
        dst = torch.zeros_like(src)
        rs, rd = a.register(src), b.register(dst)
        # Two engines of one process: CUDA IPC cannot map memory of the same process.
        assert a.path(rs, rd.descriptor) == "staged"
        steps = [
            a.prepare_write(rs, i * 4096, rd.descriptor, i * 4096, 4096, imm=40 + i)
            for i in range(4)
        ]
        counter = stolon.HostCounter(device=0)
        seen = []
        ev = threading.Event()

        def cb(old: int, new: int) -> None:
            seen.append((old, new))
            if new == 4:
                ev.set()

        _, futs = a.watch(counter, steps, callback=cb)
        stream = torch.cuda.current_stream()
        for i in range(1, 5):
            torch.cuda._sleep(1_000_000)  # the write happens on the GPU, after this spin
            counter.write_from_stream(i, stream.cuda_stream)
        assert ev.wait(30)
        for i, f in enumerate(futs):
            f.wait(30)
            b.wait_imm(40 + i, f.imm_count, timeout=30)
        torch.cuda.synchronize()
        assert torch.equal(dst.cpu(), src.cpu())
        assert seen[-1][1] == 4


@needs_two
@pytest.mark.timeout(300)
def test_fi_hmem_provider_takes_gpu_memory_directly() -> None:
    """Where the provider registers GPU memory itself (FI_HMEM: efa, verbs; shm when libfabric
    was built with CUDA), GPU regions are registered with it and written with plain RMA."""
    roles = _roles()
    torch.cuda.set_device(0)
    probe = roles.engine(0, False, provider="shm")
    hmem = probe.domain_info()[0]["hmem"]
    probe.stop()
    if not hmem:
        pytest.skip("shm here has no FI_HMEM (libfabric built without CUDA support)")
    size = 8 * MiB
    rx = roles.Remote({"device": 1, "size": size, "nvlink": False, "provider": "shm"})
    try:
        with roles.engine(0, False, provider="shm") as eng:
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
            region = eng.register(src)
            path = eng.path(region, rx.gpu_desc)
            f = eng.write(region, 0, rx.gpu_desc, 0, size, imm=3)
            f.wait(60)
            rx.expect(3, f.imm_count)
            rx.result()
            import hashlib

            want = hashlib.sha256(src.cpu().numpy().tobytes()).hexdigest()
            assert rx.call("sha", 0, size, "gpu") == want
    finally:
        rx.close()
    if path != "fabric":
        pytest.skip(
            "shm grants FI_HMEM here but cannot register CUDA memory (libfabric built without "
            "CUDA); the bytes landed through the staging fallback instead"
        )


@needs_gpu
@pytest.mark.timeout(300)
def test_nvlink_region_revoked_by_unregister_stays_untouched_after_reuse() -> None:
    """Two processes on one GPU take the CUDA IPC path. Once the owner's unregister() returns,
    the writer's writes through the old descriptor fail with WriteRejectedError, and the
    memory, handed by torch's caching allocator to a new tensor, keeps its canary."""
    roles = _roles()
    size = 8 * MiB
    dev = NGPU - 1
    rx = roles.Remote({"device": dev, "size": size, "nvlink": True})
    try:
        torch.cuda.set_device(0)
        eng = roles.engine(0, True)
        with eng:
            src = torch.full((size,), 0x5A, dtype=torch.uint8, device="cuda:0")
            region = eng.register(src)
            raw, _ptr = rx.call("victim")
            desc = stolon.MemoryDescriptor.from_bytes(raw)
            assert eng.path(region, desc) == "nvlink"
            eng.write(region, 0, desc, 0, size, imm=3).wait(60)
            reused = rx.call("revoke_victim")
            with pytest.raises(stolon.WriteRejectedError):
                eng.write(region, 0, desc, 0, size, imm=4).wait(60)
            for _ in range(20):  # and later ones too
                with pytest.raises(stolon.WriteRejectedError):
                    eng.write(region, 0, desc, 0, 4096).wait(60)
            torch.cuda.synchronize()
            assert reused, "the allocator did not hand the old block out again (nothing tested)"
            assert rx.call("check_fresh"), "bytes landed in memory reused after unregister()"
    finally:
        rx.close()


def test_gpu_tests_are_collected_even_without_gpus() -> None:
    # This module is importable everywhere torch is; the GPU cases skip with a reason.
    assert os.path.basename(__file__) == "test_gpu.py"
