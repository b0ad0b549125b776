"""The delivery contract (issue 17): success means the bytes are there, a bad write never poisons
a peer, unregister revokes, stop joins.

Real providers (tcp, udp, shm), real processes: the peer is ``tests/peer.py`` in a child process
whose regions are files this process maps read-only, so every byte that landed is checked here.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from conftest import make_engine, require_provider
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stolon

PROVIDERS = ["tcp", "udp", "shm"]
T = 20.0


def engine_threads() -> set:
    """Names of this process's threads that a stolon engine started."""
    names = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("stolon"):
            names.add(f"{name}:{tid}")
    return names


def forged(desc, *, length=None, key_delta=0):
    """`desc` with another length and/or first key, CRC recomputed: a descriptor the owner never
    published (what a buggy or hostile writer could send)."""
    raw = bytearray(desc.to_bytes())
    # Layout: magic + version (5 bytes), the owner's address fields (its own byte form less
    # those 5 bytes and its CRC), region id, base, length, keys..., then a CRC32 trailer.
    at = len(desc.address.to_bytes()) - 4 + 16
    assert struct.unpack_from("<Q", raw, at)[0] == desc.length, "descriptor layout changed"
    if length is not None:
        raw[at : at + 8] = struct.pack("<Q", length)
    if key_delta:
        (k,) = struct.unpack_from("<Q", raw, at + 8)
        raw[at + 8 : at + 16] = struct.pack("<Q", (k + key_delta) % (1 << 64))
    body = bytes(raw[:-4])
    return stolon.MemoryDescriptor.from_bytes(body + struct.pack("<I", zlib.crc32(body)))


# ------------------------------------------------------------------------------------------------
# 1. Completion levels: delivered waits for the target
# ------------------------------------------------------------------------------------------------


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGSTOP, then waits until every thread of `pid` is stopped: kill() returns before the
    signal takes effect, and a worker thread spinning on another core can still take a write
    posted in that window."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    tasks = f"/proc/{pid}/task"
    while True:
        states = []
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/stat") as f:
                    # The state follows the command name, which is in parentheses.
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue  # the thread exited
        if states and all(s in ("T", "t") for s in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.001)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", [64, 64 << 10, 16 << 20])
def test_delivered_write_waits_for_a_stopped_target(peer_factory, provider: str, size: int) -> None:
    """With the target stopped (SIGSTOP) a delivered write does not complete and nothing lands;
    after SIGCONT it completes and every byte is there."""
    require_provider(provider)
    if provider == "udp" and size > 1 << 20:
        pytest.skip("udp;ofi_rxd moves 16 MiB in seconds; the small sizes cover it")
    peer = peer_factory(provider, 1, regions=(size,))
    eng = make_engine(provider, 1, timeout=60.0)
    try:
        src = np.frombuffer(os.urandom(size), dtype=np.uint8).copy()
        region = eng.register(src)
        zero = eng.register(np.zeros(8, dtype=np.uint8))
        # Connection and lease in place first (the first write to a peer needs its progress).
        eng.write(zero, 0, peer.descriptors[0], 0, 8).wait(T)
        stop_process(peer.pid)
        try:
            fut = eng.write(region, 0, peer.descriptors[0], 0, size, imm=3)
            time.sleep(1.0)
            assert not fut.done(), "a delivered write completed while its target was stopped"
            assert not np.asarray(peer.view(0)).any(), "bytes landed in a stopped process"
        finally:
            os.kill(peer.pid, signal.SIGCONT)
        fut.wait(T)
        assert np.array_equal(np.asarray(peer.view(0)), src)
        # The immediate count is exact too.
        peer.call("wait_imms", imms={"3": fut.imm_count}, timeout=T)
    finally:
        eng.stop()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("completion", ["delivered", "local"])
def test_zero_byte_writes_complete(peer_factory, provider: str, completion: str) -> None:
    """A write of no bytes (a bare immediate, or a zero-length region write) completes at every
    completion level, and its immediate is counted exactly once. (libfabric 1.17's shm lost the
    writer's completion of a zero-byte delivery-complete write: it hung until its deadline.)"""
    require_provider(provider)
    peer = peer_factory(provider, 1, regions=(4096,))
    eng = make_engine(provider, 1, timeout=T)
    try:
        region = eng.register(np.ones(64, dtype=np.uint8))
        for _ in range(3):
            eng.write_imm(peer.address, 0x21, completion=completion).wait(T)
            eng.write(region, 0, peer.descriptors[0], 0, 0, imm=0x22, completion=completion).wait(T)
        left = peer.call("wait_imms", imms={"33": 3, "34": 3}, timeout=T)["left"]
        assert left == {"33": 0, "34": 0}, f"immediates counted more than once: {left}"
        assert not np.asarray(peer.view(0)).any(), "a zero-length write moved bytes"
    finally:
        eng.stop()


def test_a_sleeping_shm_target_wakes_after_a_stream() -> None:
    """shm has no completion-queue descriptor: an idle target sleeps until a writer rings its
    doorbell. A stream of writes rings it faster than a spinning target drains it; a full
    doorbell must still count as rung, or the writer stops ringing and later writes wait for
    the target's nap (here 30 s, longer than their timeout)."""
    require_provider("shm")
    from conftest import spawn_peer

    peer = spawn_peer("shm", 1, regions=(1 << 20,), engine={"max_sleep_us": 30_000_000})
    eng = make_engine("shm", 1, timeout=T)
    try:
        src = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8).copy()
        region = eng.register(src)
        for pause in (1.0, 1.7, 2.3):
            end = time.monotonic() + 0.2  # about 200 rings while the target spins
            while time.monotonic() < end:
                eng.write(region, 0, peer.descriptors[0], 0, 4096).wait(T)
            # The target goes to sleep (its spin is 20 ms); its naps grow towards 30 s, so a
            # write that did not ring it waits for most of a nap of a second or more.
            time.sleep(pause)
            eng.write(region, 0, peer.descriptors[0], 0, 1 << 20, imm=5).wait(0.3)
        assert np.array_equal(np.asarray(peer.view(0)), src)
        left = peer.call("wait_imms", imms={"5": 3}, timeout=T)["left"]
        assert left == {"5": 0}
    finally:
        eng.stop()
        peer.close()


def test_completion_argument_is_checked() -> None:
    eng = make_engine("tcp", 1)
    try:
        r = eng.register(np.zeros(64, dtype=np.uint8))
        with pytest.raises(stolon.InvalidArgumentError):
            eng.write(r, 0, r.descriptor, 0, 8, completion="eventually")
        with pytest.raises(stolon.InvalidArgumentError):
            make_engine("tcp", 1, completion="sometimes")
        eng.write(r, 0, r.descriptor, 8, 8, completion="local").wait(T)
        eng.write(r, 0, r.descriptor, 16, 8, completion="delivered").wait(T)
    finally:
        eng.stop()


# ------------------------------------------------------------------------------------------------
# 2. Target-side rejections come back, and poison nothing
# ------------------------------------------------------------------------------------------------

KINDS = ["write", "paged", "scatter"]
BADS = ["stale", "forged_length", "unknown_key"]


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    domains=st.integers(1, 4),
    steps=st.lists(
        st.tuples(st.sampled_from(KINDS), st.sampled_from(["good", *BADS])),
        min_size=4,
        max_size=14,
    ),
)
def test_bad_descriptors_interleaved_with_good_writes(peer_factory, domains, steps) -> None:
    """Over one connection, good writes and writes through stale, forged-length and unknown-key
    descriptors in random order: every good one lands and is counted exactly, every bad one
    raises WriteRejectedError, nothing lands outside the good ranges, and the peer and a new
    peer still work afterwards."""
    page = 4096
    n_pages = 2 * len(steps) + 2
    peer = peer_factory("tcp", domains, regions=(n_pages * page, page, page))
    eng = make_engine("tcp", domains, timeout=T)
    try:
        src = np.frombuffer(os.urandom(n_pages * page), dtype=np.uint8).copy()
        region = eng.register(src)
        good = peer.descriptors[0]
        stale = peer.descriptors[1]
        assert peer.call("unregister", region=1)["revoked"]
        # Region 2 is registered and never written: it must stay zero.
        bad_descs = {
            "stale": stale,
            "forged_length": forged(good, length=good.length + (64 << 20)),
            "unknown_key": forged(good, key_delta=0x7777),
        }
        expected = np.zeros(n_pages * page, dtype=np.uint8)
        imm = 100
        counts: dict = {}
        for i, (kind, what) in enumerate(steps):
            src_off = (i % (n_pages - 1)) * page
            off = {
                "good": 2 * i * page,
                "unknown_key": 2 * i * page,
                "stale": 0,  # inside the (unregistered) one-page region
                "forged_length": good.length + page,  # past the real region, inside the forgery
            }[what]
            dst = good if what == "good" else bad_descs[what]
            imm += 1
            if kind == "write":
                call = lambda d=dst, o=off, m=imm, so=src_off: eng.write(  # noqa: E731
                    region, so, d, o, page, m
                )
            elif kind == "paged":
                call = lambda d=dst, o=off, m=imm, so=src_off: eng.write_paged(  # noqa: E731
                    region, d, page, [0], [0], src_offset=so, dst_offset=o, imm=m
                )
            else:
                call = lambda d=dst, o=off, m=imm, so=src_off: eng.scatter(  # noqa: E731
                    region, [(d, so, o, page)], m
                )
            fut = call()
            if what == "good":
                fut.wait(T)
                expected[off : off + page] = src[src_off : src_off + page]
                counts[str(imm)] = fut.imm_count
            else:
                with pytest.raises(stolon.WriteRejectedError):
                    fut.wait(T)
        peer.call("wait_imms", imms=counts, timeout=T)
        got = peer.call("imm_count", imms=[int(k) for k in counts])["counts"]
        assert got == {k: 0 for k in counts}, "more immediates than the good writes made"
        assert np.array_equal(np.asarray(peer.view(0)), expected)
        assert not np.asarray(peer.view(2)).any()
        # The owner refuses each distinct bad descriptor once; the writer remembers the answer.
        assert peer.stats_sum("rejected") == len({w for _, w in steps if w != "good"})
        # The same connection still carries good writes, and a new peer is reachable.
        eng.write(region, 0, good, 0, page, 7).wait(T)
        other = peer_factory("tcp", domains, regions=(page,))
        eng.write(region, 0, other.descriptors[0], 0, page, 8).wait(T)
        assert np.array_equal(np.asarray(other.view(0)), src[:page])
    finally:
        eng.stop()


@pytest.mark.parametrize("provider", ["udp", "shm"])
def test_stale_descriptor_is_rejected_and_the_peer_keeps_working(peer_factory, provider) -> None:
    """The providers that used to hang after one bad write (udp, shm) refuse it cleanly."""
    require_provider(provider)
    peer = peer_factory(provider, 1, regions=(4096, 4096))
    eng = make_engine(provider, 1, timeout=T)
    try:
        src = eng.register(np.full(4096, 0x42, dtype=np.uint8))
        assert peer.call("unregister", region=1)["revoked"]
        with pytest.raises(stolon.WriteRejectedError):
            eng.write(src, 0, peer.descriptors[1], 0, 4096, 1).wait(T)
        eng.write(src, 0, peer.descriptors[0], 0, 4096, 2).wait(T)
        assert (np.asarray(peer.view(0)) == 0x42).all()
        assert not np.asarray(peer.view(1)).any()
        other = peer_factory(provider, 1, regions=(4096,))
        eng.write(src, 0, other.descriptors[0], 0, 4096, 3).wait(T)
        assert (np.asarray(other.view(0)) == 0x42).all()
    finally:
        eng.stop()


# ------------------------------------------------------------------------------------------------
# 3. Revocation: nothing lands after unregister() returned
# ------------------------------------------------------------------------------------------------


def test_no_byte_lands_after_unregister_returned_under_streaming_writes() -> None:
    """1,000 regions, each written by a streaming writer thread while the owner unregisters it;
    right after unregister() returns the owner paints the memory with a canary; the writer keeps
    writing until its writes are refused. The canary must survive: no write landed after the
    unregister returned."""
    rounds = int(os.environ.get("STOLON_REVOKE_ROUNDS", "1000"))
    owner = make_engine("tcp", 2, timeout=T, revoke_timeout=5.0)
    writer = make_engine("tcp", 2, timeout=T)
    try:
        src = writer.register(np.full(1 << 16, 0x11, dtype=np.uint8))
        for i in range(rounds):
            mem = np.zeros(1 << 16, dtype=np.uint8)
            reg = owner.register(mem)
            desc = reg.descriptor
            refused = threading.Event()
            wrote = threading.Event()

            def stream(desc=desc, refused=refused, wrote=wrote) -> None:
                n = 0
                while not refused.is_set() and n < 10_000:
                    size = 4096 if n % 2 else 1 << 16
                    try:
                        writer.write(src, 0, desc, 0, size).wait(T)
                        wrote.set()
                    except stolon.WriteRejectedError:
                        refused.set()
                    n += 1

            th = threading.Thread(target=stream)
            th.start()
            assert wrote.wait(T)
            if i % 2:
                owner.unregister(reg)
            else:
                owner.unregister(reg)
                del reg  # the drop after an explicit unregister is a no-op
            mem[:] = 0xCC  # the canary
            th.join(T)
            assert refused.is_set(), "writes to an unregistered region kept succeeding"
            time.sleep(0.001 if i % 10 else 0.02)
            assert (mem == 0xCC).all(), f"round {i}: bytes landed after unregister() returned"
    finally:
        writer.stop()
        owner.stop()


def test_region_drops_under_streaming_writes_refuse_later_writes() -> None:
    """Dropping the last handle of a region revokes it like unregister(): later writes through
    its descriptor are refused, the engines keep working, nothing crashes."""
    owner = make_engine("tcp", 1, timeout=T)
    writer = make_engine("tcp", 1, timeout=T)
    try:
        src = writer.register(np.full(4096, 0x22, dtype=np.uint8))
        for _ in range(200):
            reg = owner.register(np.zeros(4096, dtype=np.uint8))
            desc = reg.descriptor
            writer.write(src, 0, desc, 0, 4096).wait(T)
            del reg
            deadline = time.monotonic() + T
            while True:
                try:
                    writer.write(src, 0, desc, 0, 4096).wait(T)
                except stolon.WriteRejectedError:
                    break
                assert time.monotonic() < deadline, "a dropped region kept taking writes"
        keep = owner.register(np.zeros(4096, dtype=np.uint8))
        writer.write(src, 0, keep.descriptor, 0, 4096).wait(T)
    finally:
        writer.stop()
        owner.stop()


# ------------------------------------------------------------------------------------------------
# 4. stop(): every future resolves, every thread joined, no crash
# ------------------------------------------------------------------------------------------------


def test_stop_with_a_thousand_transfers_in_flight() -> None:
    before = engine_threads()
    a = make_engine("tcp", 2, timeout=T)
    b = make_engine("tcp", 2, timeout=T)
    src = a.register(np.ones(1 << 20, dtype=np.uint8))
    dst = b.register(np.zeros(1 << 20, dtype=np.uint8))
    futs = [a.write(src, 0, dst.descriptor, 0, 1 << 14, imm=1) for _ in range(1000)]
    done = []
    for f in futs[:10]:
        f.add_done_callback(done.append)
    a.stop()
    for f in futs:
        try:
            f.wait(5.0)
        except (stolon.EngineStoppedError, stolon.TransferError):
            pass
        assert f.done()
    b.stop()
    assert engine_threads() == before, "threads left after stop()"
    assert len(done) == 10, "callbacks of resolved futures did not all run"


def _stream_until_error(eng, src, desc, stop_flag, errors, wrote) -> None:
    while not stop_flag.is_set():
        try:
            eng.write(src, 0, desc, 0, 1 << 16, imm=9).wait(T)
            wrote.set()
        except stolon.StolonError as e:
            errors.append(type(e).__name__)
            return


def test_stopping_a_receiver_while_peers_stream_into_it_in_one_process() -> None:
    """Two engines in one process, 100 runs: the receiver stops while the sender streams; no
    crash, the sender gets errors, nothing lands after stop() returned."""
    runs = int(os.environ.get("STOLON_STOP_RUNS", "100"))
    for _ in range(runs):
        a = make_engine("tcp", 1, timeout=5.0)
        b = make_engine("tcp", 1, timeout=5.0, revoke_timeout=1.0)
        src = a.register(np.full(1 << 16, 0x33, dtype=np.uint8))
        mem = np.zeros(1 << 16, dtype=np.uint8)
        dst = b.register(mem)
        flag, wrote = threading.Event(), threading.Event()
        errors: list = []
        th = threading.Thread(
            target=_stream_until_error, args=(a, src, dst.descriptor, flag, errors, wrote)
        )
        th.start()
        assert wrote.wait(T), "no write landed before the stop"
        b.stop()
        mem[:] = 0xCC
        th.join(T)
        flag.set()
        assert errors, "the sender saw no error from a stopped receiver"
        time.sleep(0.01)
        assert (mem == 0xCC).all(), "bytes landed after the receiver's stop() returned"
        a.stop()


def test_stopping_a_receiver_process_while_streaming(peer_factory) -> None:
    """Across processes: the receiver process stops its engine (exit) while this process
    streams into it; the writes fail with stolon errors and this engine keeps working."""
    runs = int(os.environ.get("STOLON_STOP_PROC_RUNS", "20"))
    eng = make_engine("tcp", 1, timeout=5.0)
    try:
        src = eng.register(np.full(1 << 16, 0x44, dtype=np.uint8))
        for _ in range(runs):
            peer = peer_factory("tcp", 1, regions=(1 << 16,))
            flag, wrote = threading.Event(), threading.Event()
            errors: list = []
            th = threading.Thread(
                target=_stream_until_error,
                args=(eng, src, peer.descriptors[0], flag, errors, wrote),
            )
            th.start()
            assert wrote.wait(T), "no write landed before the stop"
            peer.close()
            th.join(T)
            flag.set()
            assert errors, "no error after the receiver went away"
        last = peer_factory("tcp", 1, regions=(1 << 16,))
        eng.write(src, 0, last.descriptors[0], 0, 1 << 16).wait(T)
        assert (np.asarray(last.view(0)) == 0x44).all()
    finally:
        eng.stop()


def test_a_dropped_region_releases_its_memory_while_python_sleeps() -> None:
    """The object a region keeps alive goes once the engine has closed the registration, even
    if Python then only sleeps (a decref deferred to the next PyO3 call kept an unregistered
    tensor allocated)."""
    import weakref

    class Buf(bytearray):
        pass

    eng = make_engine("tcp", 1, timeout=T)
    try:
        for explicit in (True, False):
            buf = Buf(1 << 16)
            gone = weakref.ref(buf)
            region = eng.register(buf)
            del buf
            if explicit:
                eng.unregister(region)
            del region
            deadline = time.monotonic() + 5
            while gone() is not None:
                assert time.monotonic() < deadline, "the registered object was never released"
                time.sleep(0.01)
    finally:
        eng.stop()
