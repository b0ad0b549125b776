"""The staging protocol GPU destinations use over providers without GPU support, run with staged
host regions so it is tested on machines without a GPU (tests/test_gpu.py runs it with real GPU
memory). Separate processes, tcp on loopback."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from typing import Any, Iterator

import numpy as np
import pytest

import stolon
from stolon.engine import loopback_nodes

MiB = 1 << 20


def _receiver(conn, size: int) -> None:  # child process
    with stolon.TransferEngine("tcp", 2, nodes=loopback_nodes("tcp", 2)) as eng:
        buf = np.zeros(size, dtype=np.uint8)
        region = eng.register(buf, staged=True)
        assert region.memory == "staged_host"
        conn.send(region.descriptor.to_bytes())
        while True:
            msg = conn.recv()
            if msg is None:
                break
            imm, count = msg
            eng.wait_imm(imm, count, timeout=30)
            conn.send((bytes(buf), eng.imm_count(imm)))


@contextlib.contextmanager
def _child(target, size: int) -> Iterator[Any]:
    """A spawned process running `target(conn, size)`; yields this side's connection."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, size), daemon=True)
    proc.start()
    try:
        yield parent
    finally:
        proc.join(20)
        if proc.is_alive():
            proc.kill()


@pytest.mark.timeout(120)
def test_staged_writes_land_exactly_across_processes() -> None:
    size = 6 * MiB
    with _child(_receiver, size) as parent:
        with stolon.TransferEngine("tcp", 2, nodes=loopback_nodes("tcp", 2)) as eng:
            desc = stolon.MemoryDescriptor.from_bytes(parent.recv())
            assert desc.staged
            rng = np.random.default_rng(1)
            src = rng.integers(0, 256, size, dtype=np.uint8)
            region = eng.register(src)
            want = np.zeros(size, dtype=np.uint8)
            futs = []
            # A sharded single write, chunked into messages.
            futs.append(eng.write(region, 0, desc, 0, 4 * MiB + 3, imm=1))
            want[: 4 * MiB + 3] = src[: 4 * MiB + 3]
            assert futs[-1].imm_count == eng.imm_count_for(region, desc, 4 * MiB + 3)
            # Paged into the tail.
            base = 5 * MiB
            futs.append(eng.write_paged(region, desc, 8192, [9, 2], [1, 0], dst_offset=base, imm=1))
            want[base : base + 8192] = src[2 * 8192 : 3 * 8192]
            want[base + 8192 : base + 16384] = src[9 * 8192 : 10 * 8192]
            # Scatter of two items, including an empty one (an immediate only).
            futs.append(
                eng.scatter(region, [(desc, 7, 5 * MiB + 20000, 100), (desc, 0, 0, 0)], imm=1)
            )
            want[5 * MiB + 20000 : 5 * MiB + 20100] = src[7:107]
            for f in futs:
                f.wait(30)
            total = sum(f.imm_count for f in futs)
            parent.send((1, total))
            got, left = parent.recv()
            assert left == 0
            got = np.frombuffer(got, dtype=np.uint8)
            bad = np.nonzero(got != want)[0]
            assert bad.size == 0, f"first wrong byte at {bad[:1]}"
        parent.send(None)


def _two_region_receiver(conn, size: int) -> None:  # child process
    with stolon.TransferEngine("tcp", 2, nodes=loopback_nodes("tcp", 2)) as eng:
        plain = np.zeros(size, dtype=np.uint8)
        staged = np.zeros(size, dtype=np.uint8)
        regions = [eng.register(plain), eng.register(staged, staged=True)]
        conn.send([r.descriptor.to_bytes() for r in regions])
        imm, count = conn.recv()
        eng.wait_imm(imm, count, timeout=30)
        conn.send((bytes(plain), bytes(staged), eng.imm_count(imm)))


@pytest.mark.timeout(120)
def test_a_scatter_cuts_each_item_by_its_destinations_path() -> None:
    """One scatter into a plain host region (the fabric) and a staged one (staging chunks):
    each item's immediates are what `imm_count_for` says for its destination,
    the receiver counts exactly their sum, and every byte lands."""
    size = 6 * MiB
    with _child(_two_region_receiver, size) as parent:
        with stolon.TransferEngine("tcp", 2, nodes=loopback_nodes("tcp", 2)) as eng:
            plain, staged = (stolon.MemoryDescriptor.from_bytes(b) for b in parent.recv())
            assert staged.staged and not plain.staged
            src = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
            region = eng.register(src)
            items = [(plain, 0, 0, 4 * MiB + 3), (staged, 5, 100, 4 * MiB + 3), (staged, 9, 0, 0)]
            per = [eng.imm_count_for(region, d, n) for d, _, _, n in items]
            # The staged path cuts the item into staging-sized messages; the fabric does not.
            assert per[1] > 1 and per[1] != per[0], per
            fut = eng.scatter(region, items, imm=3)
            fut.wait(30)
            assert fut.imm_count == sum(per)
            parent.send((3, sum(per)))
            got_plain, got_staged, left = parent.recv()
            assert left == 0
            n = 4 * MiB + 3
            assert np.array_equal(np.frombuffer(got_plain, dtype=np.uint8)[:n], src[:n])
            assert np.array_equal(
                np.frombuffer(got_staged, dtype=np.uint8)[100 : 100 + n], src[5 : 5 + n]
            )


def test_staged_region_bounds_and_gpu_without_cuda() -> None:
    with stolon.TransferEngine("tcp", 1, nodes=loopback_nodes("tcp", 1)) as eng:
        dst = eng.register(bytearray(1000), staged=True)
        src = eng.register(bytearray(2000))
        with pytest.raises(stolon.OutOfBoundsError):
            eng.write(src, 0, dst.descriptor, 999, 2)
        with pytest.raises(stolon.ConfigError):
            eng.register_gpu_ptr(0x1000, 10)
