"""Progress watchers and completion flags on the CPU (host-memory counters, tcp on loopback).

The same mechanism with GPU-mapped counters written by CUDA streams is exercised by
tests/test_gpu.py on a GPU machine."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import stolon
from stolon.engine import loopback_nodes

KiB = 1 << 10


def _pair(domains: int = 2):
    kw = {"nodes": loopback_nodes("tcp", domains)}
    return stolon.TransferEngine("tcp", domains, **kw), stolon.TransferEngine("tcp", domains, **kw)


@pytest.mark.timeout(60)
def test_counter_releases_layers_in_order_and_only_when_due() -> None:
    a, b = _pair()
    with a, b:
        layers, page = 6, 16 * KiB
        src = np.random.default_rng(3).integers(0, 256, layers * page, dtype=np.uint8)
        dst = np.zeros_like(src)
        rs, rd = a.register(src), b.register(dst)
        steps = [
            a.prepare_write(rs, i * page, rd.descriptor, i * page, page, imm=50 + i)
            for i in range(layers)
        ]
        assert [p.imm_count for p in steps] == [a.imm_count_write(page)] * layers
        counter = stolon.HostCounter()
        changes: list = []
        wid, futs = a.watch(counter, steps, callback=lambda o, n: changes.append((o, n)))
        assert all(p.used for p in steps)
        with pytest.raises(stolon.InvalidArgumentError):
            a.submit(steps[0])  # already handed to the watch
        for i in range(layers):
            time.sleep(0.02)
            assert not futs[i].done(), f"layer {i} left before the counter reached {i + 1}"
            assert b.imm_count(50 + i) == 0
            counter.add()
            futs[i].wait(10)
            b.wait_imm(50 + i, futs[i].imm_count, timeout=10)
            assert np.array_equal(dst[i * page : (i + 1) * page], src[i * page : (i + 1) * page])
        time.sleep(0.05)
        assert changes == [(i, i + 1) for i in range(layers)]
        a.unwatch(wid)


@pytest.mark.timeout(60)
def test_a_jump_releases_every_step_due_and_unwatch_fails_the_rest() -> None:
    a, b = _pair(1)
    with a, b:
        src = np.arange(4 * KiB, dtype=np.uint8)
        dst = np.zeros_like(src)
        rs, rd = a.register(src), b.register(dst)
        steps = [a.prepare_write(rs, i * KiB, rd.descriptor, i * KiB, KiB, imm=7) for i in range(4)]
        counter = stolon.HostCounter(value=0)
        wid, futs = a.watch(counter, steps)
        counter.set(3)  # three layers finished at once
        for f in futs[:3]:
            f.wait(10)
        b.wait_imm(7, 3, timeout=10)
        a.unwatch(wid)
        with pytest.raises(stolon.EngineStoppedError):
            futs[3].wait(10)
        assert np.array_equal(dst[: 3 * KiB], src[: 3 * KiB])
        assert not dst[3 * KiB :].any()


@pytest.mark.timeout(60)
def test_completion_flag_is_set_when_all_immediates_landed() -> None:
    a, b = _pair(2)
    with a, b:
        size = 4 << 20
        src = np.ones(size, dtype=np.uint8)
        dst = np.zeros_like(src)
        rs, rd = a.register(src), b.register(dst)
        flag = stolon.HostCounter()
        n = a.imm_count_write(size)
        b.expect_imm_flag(9, n, flag, value=5)
        assert flag.value == 0
        a.write(rs, 0, rd.descriptor, 0, size, imm=9).wait(10)
        deadline = time.monotonic() + 10
        while flag.value != 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert flag.value == 5
        assert dst.all()
        assert b.imm_count(9) == 0
        # A flag that times out says so with u64::MAX.
        late = stolon.HostCounter()
        b.expect_imm_flag(10, 1, late, value=1, timeout=0.05)
        time.sleep(0.3)
        assert late.value == 2**64 - 1


def test_counter_basics_and_gpu_features_refuse_on_host_counters() -> None:
    c = stolon.HostCounter(value=3)
    assert c.value == 3 and c.add(2) == 5 and c.device is None
    c.set(9)
    assert c.value == 9
    assert c.host_ptr % 8 == 0
    with pytest.raises(stolon.InvalidArgumentError):
        c.write_from_stream(1)
    with pytest.raises(stolon.InvalidArgumentError):
        _ = c.device_ptr


def test_gpu_counter_without_cuda_is_a_clear_error() -> None:
    if stolon.cuda_info().get("present"):
        pytest.skip("CUDA is present here; tests/test_gpu.py covers GPU counters")
    with pytest.raises(stolon.CudaUnavailableError) as e:
        stolon.HostCounter(device=0)
    assert "libcuda" in str(e.value)


def test_watch_callbacks_run_off_the_worker_thread() -> None:
    a, _b = _pair(1)
    with a, _b:
        c = stolon.HostCounter()
        seen = []
        done = threading.Event()

        def cb(old: int, new: int) -> None:
            seen.append((threading.current_thread().name, old, new))
            done.set()

        a.watch(c, [], callback=cb)
        c.add()
        assert done.wait(10)
        assert seen[0][1:] == (0, 1)


def test_gpu_flags_need_gdrcopy_and_say_so() -> None:
    """Without GDRCopy (and here without CUDA) a GpuFlag cannot be made: a typed error saying
    why; `available()` answers without raising. expect_imm_flag takes only counters or flags."""
    if stolon.GpuFlag.available():
        pytest.skip("GDRCopy is installed here; tests/test_gpu.py uses it")
    with pytest.raises(stolon.CudaUnavailableError):
        stolon.GpuFlag(0)
    with stolon.TransferEngine("tcp", 1, nodes=loopback_nodes("tcp", 1)) as eng:
        with pytest.raises(stolon.InvalidArgumentError, match="HostCounter or a GpuFlag"):
            eng.expect_imm_flag(1, 1, object())
