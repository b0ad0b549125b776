"""Bad inputs raise their own exception and nothing lands; dead peers and stop() never hang.

The receiver is a child process (``tests/peer.py``); "nothing lands" means every byte of its
regions is unchanged and its ``imms_received`` counter did not move.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
from typing import Callable

import numpy as np
import pytest
from conftest import PeerError, make_engine, require_provider, run_isolated, spawn_peer

import stolon

pytestmark = pytest.mark.timeout(120)

KiB = 1 << 10
MiB = 1 << 20
SRC = 1 * MiB
DST = 256 * KiB
AUX = 64 * KiB
ENGINE_TIMEOUT = 3.0


class Rig:
    """A tcp parent engine (2 domains) and a tcp child process (2 domains), for the module."""

    def __init__(self) -> None:
        self.eng = make_engine("tcp", 2, timeout=ENGINE_TIMEOUT, min_shard_bytes=64 * KiB)
        self.src = np.random.default_rng(3).integers(0, 256, SRC, dtype=np.uint8)
        self.region = self.eng.register(self.src)
        self.peer = spawn_peer("tcp", 2, regions=(DST, AUX))
        self.dst = self.peer.descriptors[0]
        self.aux = self.peer.descriptors[1]
        self.other = make_engine("tcp", 1, timeout=ENGINE_TIMEOUT)
        self.other_buf = np.zeros(4096, dtype=np.uint8)
        self.other_region = self.other.register(self.other_buf)

    def close(self) -> None:
        self.peer.close()
        self.eng.stop()
        self.other.stop()


@pytest.fixture(scope="module")
def rig():
    require_provider("tcp")
    r = Rig()
    yield r
    r.close()


@contextlib.contextmanager
def nothing_lands(rig: Rig):
    """Asserts that the block changes no byte of the child's regions and delivers no immediate."""
    before = [np.array(rig.peer.view(i)) for i in range(2)]
    imms = rig.peer.stats_sum("imms_received")
    sent = sum(d["write_ops"] for d in rig.eng.stats())
    yield
    time.sleep(0.05)
    for i in range(2):
        assert np.array_equal(rig.peer.view(i), before[i]), f"region {i} of the child changed"
    assert rig.peer.stats_sum("imms_received") == imms, "an immediate arrived"
    assert sum(d["write_ops"] for d in rig.eng.stats()) == sent, "an op was posted"


def _still_works(rig: Rig) -> None:
    """The engine is usable after the bad calls: a good write lands and is counted."""
    f = rig.eng.write(rig.region, 10, rig.dst, 20, 1000, 0x600D)
    f.wait(10)
    rig.peer.call("wait_imms", imms={str(0x600D): f.imm_count}, timeout=10)
    assert np.array_equal(rig.peer.view(0)[20:1020], rig.src[10:1010])


# ------------------------------------------------------------------------------------------------
# bad requests, each with its own exception
# ------------------------------------------------------------------------------------------------

E = stolon
BAD_CALLS: list = [
    pytest.param(
        lambda r: r.eng.write(r.region, SRC - 10, r.dst, 0, 11, 1),
        E.OutOfBoundsError,
        id="src range past end",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, SRC + 1, r.dst, 0, 0, 1),
        E.OutOfBoundsError,
        id="src offset past end",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, DST - 10, 11, 1),
        E.OutOfBoundsError,
        id="dst range past end",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, DST + 1, 0, 1),
        E.OutOfBoundsError,
        id="dst offset past end",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 0, SRC + 1),
        E.OutOfBoundsError,
        id="length larger than both",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 2**63, r.dst, 0, 1, 1),
        E.OutOfBoundsError,
        id="huge src offset",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 2**64 - 1, 1, 1),
        E.OutOfBoundsError,
        id="huge dst offset",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 2**63, r.dst, 0, 2**63, 1),
        E.OutOfBoundsError,
        id="offset+length overflows",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 4096, [0, 1], [0, DST // 4096], imm=1),
        E.OutOfBoundsError,
        id="paged dst page past end",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 4096, [SRC // 4096], [0], imm=1),
        E.OutOfBoundsError,
        id="paged src page past end",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 16, [0], [0], dst_offset=DST - 15, imm=1),
        E.OutOfBoundsError,
        id="paged dst_offset past end",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 1, [0], [2**32 - 1], dst_stride=2**40, imm=1),
        E.OutOfBoundsError,
        id="paged extent overflows",
    ),
    pytest.param(
        lambda r: r.eng.scatter(
            r.region, [(r.dst, 0, 0, 100), (r.aux, 0, 0, AUX + 1), (r.dst, 0, 200, 100)], 1
        ),
        E.OutOfBoundsError,
        id="scatter: one bad item of three",
    ),
    pytest.param(
        lambda r: r.eng.scatter(r.region, [(r.dst, 0, 0, 100), (r.aux, SRC, 0, 1)], 1),
        E.OutOfBoundsError,
        id="scatter: bad src item",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 1, pin_domain=2),
        E.InvalidArgumentError,
        id="pin_domain out of range",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 8, [0], [0], imm=1, pin_domain=7),
        E.InvalidArgumentError,
        id="pin_domain out of range, paged",
    ),
    pytest.param(
        lambda r: r.eng.scatter(r.region, [(r.dst, 0, 0, 8)], 1, pin_domain=16),
        E.InvalidArgumentError,
        id="pin_domain out of range, scatter",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 1, sharding="striped"),
        E.InvalidArgumentError,
        id="unknown sharding",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 64, [0, 1, 2], [0, 1], imm=1),
        E.InvalidArgumentError,
        id="paged lists differ in length",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 64, [0, 1], [0, 1], dst_stride=32, imm=1),
        E.InvalidArgumentError,
        id="paged page larger than dst stride",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 64, [0, 1], [0, 1], src_stride=63, imm=1),
        E.InvalidArgumentError,
        id="paged page larger than src stride",
    ),
    pytest.param(
        lambda r: r.eng.write(r.other_region, 0, r.dst, 0, 10, 1),
        E.UnregisteredMemoryError,
        id="region of another engine",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.other_region, r.dst, 8, [0], [0], imm=1),
        E.UnregisteredMemoryError,
        id="region of another engine, paged",
    ),
    pytest.param(
        lambda r: r.eng.scatter(r.other_region, [(r.dst, 0, 0, 8)], 1),
        E.UnregisteredMemoryError,
        id="region of another engine, scatter",
    ),
    pytest.param(
        lambda r: r.eng.send(r.peer.address, bytes(65537)),
        E.MessageTooLargeError,
        id="message too large",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 1, timeout=-1.0),
        E.InvalidArgumentError,
        id="negative write timeout",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 1, timeout=math.nan),
        E.InvalidArgumentError,
        id="nan write timeout",
    ),
    pytest.param(
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 1, timeout=math.inf),
        E.InvalidArgumentError,
        id="infinite write timeout",
    ),
    pytest.param(
        lambda r: r.eng.write_imm(r.peer.address, 1, timeout=-0.5),
        E.InvalidArgumentError,
        id="negative write_imm timeout",
    ),
    pytest.param(
        lambda r: r.eng.write_paged(r.region, r.dst, 8, [0], [0], imm=1, timeout=math.nan),
        E.InvalidArgumentError,
        id="nan paged timeout",
    ),
    pytest.param(
        lambda r: r.eng.scatter(r.region, [(r.dst, 0, 0, 8)], 1, timeout=-1e-9),
        E.InvalidArgumentError,
        id="negative scatter timeout",
    ),
    pytest.param(
        lambda r: r.eng.send(r.peer.address, b"x", timeout=-1.0),
        E.InvalidArgumentError,
        id="negative send timeout",
    ),
    pytest.param(
        lambda r: r.eng.wait_imm(5, 1, timeout=-1.0),
        E.InvalidArgumentError,
        id="negative wait_imm timeout",
    ),
    pytest.param(
        lambda r: r.eng.recv(timeout=math.nan), E.InvalidArgumentError, id="nan recv timeout"
    ),
    pytest.param(
        lambda r: r.eng.barrier([r.eng.address, r.peer.address], 9, timeout=math.inf),
        E.InvalidArgumentError,
        id="infinite barrier timeout",
    ),
    pytest.param(
        lambda r: r.eng.expect_imm(5, 1, print, timeout=-1.0),
        E.InvalidArgumentError,
        id="negative expect_imm timeout",
    ),
]


@pytest.mark.parametrize("call,exc", BAD_CALLS)
def test_bad_request_raises_and_nothing_lands(rig: Rig, call: Callable, exc: type) -> None:
    with nothing_lands(rig):
        with pytest.raises(exc) as info:
            call(rig)
        assert isinstance(info.value, stolon.StolonError)
    _still_works(rig)


def test_unregistered_local_region(rig: Rig) -> None:
    buf = np.ones(8192, dtype=np.uint8)
    region = rig.eng.register(buf)
    assert not region.revoked
    rig.eng.unregister(region)
    assert region.revoked
    with nothing_lands(rig):
        with pytest.raises(stolon.UnregisteredMemoryError):
            rig.eng.write(region, 0, rig.dst, 0, 10, 1)
        with pytest.raises(stolon.UnregisteredMemoryError):
            rig.eng.write_paged(region, rig.dst, 16, [0], [0], imm=1)
        with pytest.raises(stolon.UnregisteredMemoryError):
            rig.eng.scatter(region, [(rig.dst, 0, 0, 10)], 1)
    _still_works(rig)


def test_waits_with_bad_timeouts(rig: Rig) -> None:
    f = rig.eng.write_imm(rig.peer.address, 0x77)
    for bad in (-1.0, math.nan, math.inf, -math.inf):
        with pytest.raises(stolon.InvalidArgumentError):
            f.wait(bad)
    f.wait(10)
    rig.peer.call("wait_imms", imms={str(0x77): 1}, timeout=10)
    # A zero timeout is fine: it just does not wait.
    with pytest.raises(stolon.TransferTimeoutError):
        rig.eng.wait_imm(0x78, 1, timeout=0.0)
    with pytest.raises(stolon.TransferTimeoutError):
        rig.eng.recv(timeout=0)
    rig.eng.wait_imm(0x78, 0, timeout=0.0)


def test_descriptor_of_another_provider(rig: Rig) -> None:
    """An shm descriptor or address given to a tcp engine: DomainMismatchError, nothing moves."""
    require_provider("shm")
    with make_engine("shm", 1) as shm:
        buf = np.zeros(4096, dtype=np.uint8)
        shm_region = shm.register(buf)  # kept alive: dropping it would unregister it
        desc = shm_region.descriptor
        with nothing_lands(rig):
            with pytest.raises(stolon.DomainMismatchError):
                rig.eng.write(rig.region, 0, desc, 0, 100, 1)
            with pytest.raises(stolon.DomainMismatchError):
                rig.eng.write_paged(rig.region, desc, 16, [0, 1], [1, 0], imm=1)
            with pytest.raises(stolon.DomainMismatchError):
                rig.eng.scatter(rig.region, [(rig.dst, 0, 0, 8), (desc, 0, 0, 8)], 1)
            with pytest.raises(stolon.DomainMismatchError):
                rig.eng.write_imm(shm.address, 1)
            with pytest.raises(stolon.DomainMismatchError):
                rig.eng.send(shm.address, b"hello")
            # ... and the other way round.
            with pytest.raises(stolon.DomainMismatchError):
                shm.write(shm.register(np.ones(64, dtype=np.uint8)), 0, rig.dst, 0, 64, 1)
            with pytest.raises(stolon.DomainMismatchError):
                shm.write_imm(rig.peer.address, 1)
        time.sleep(0.05)
        assert not buf.any()
        assert sum(d["imms_received"] for d in shm.stats()) == 0
    _still_works(rig)


@pytest.mark.parametrize(
    "kwargs,exc",
    [
        ({"provider": "no-such-provider"}, stolon.ProviderNotFoundError),
        ({"domains": 0}, stolon.ConfigError),
        ({"domains": 17}, stolon.ConfigError),
        ({"min_shard_bytes": 1000}, stolon.ConfigError),
        ({"max_op_bytes": 100}, stolon.ConfigError),
        ({"recv_buffers": 0}, stolon.ConfigError),
        ({"send_buffers": 0}, stolon.ConfigError),
        ({"max_message_bytes": 0}, stolon.ConfigError),
        ({"domains": 2, "interfaces": ["lo"]}, stolon.ConfigError),
        ({"domains": 1, "nodes": ["127.0.0.1", "127.0.0.1"]}, stolon.ConfigError),
        ({"timeout": -1.0}, (stolon.InvalidArgumentError, stolon.ConfigError)),
        ({"timeout": math.nan}, (stolon.InvalidArgumentError, stolon.ConfigError)),
        ({"timeout": math.inf}, (stolon.InvalidArgumentError, stolon.ConfigError)),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_bad_engine_config(kwargs: dict, exc) -> None:
    require_provider("tcp")
    kw = {"provider": "tcp", **kwargs}
    n = kw.get("domains", 1)
    if kw["provider"] == "tcp" and 1 <= n <= 16 and not {"nodes", "interfaces"} & set(kw):
        kw["nodes"] = ["127.0.0.1"] * n  # stay on loopback should the engine open at all
    with pytest.raises(exc) as info:
        stolon.TransferEngine(**kw).stop()
    assert isinstance(info.value, stolon.StolonError)


@pytest.mark.parametrize(
    "obj,length",
    [
        (b"read-only bytes", None),
        (np.zeros((4, 4), dtype=np.uint8)[:, ::2], None),  # not contiguous
        (bytearray(16), 17),  # longer than the object
        (bytearray(16), -1),
        (12345, None),  # a pointer needs a length
        (0, 16),  # null pointer
        ("a string", None),
    ],
    ids=["bytes", "strided", "too-long", "negative-length", "pointer-no-length", "null", "str"],
)
def test_bad_registration(rig: Rig, obj, length) -> None:
    with pytest.raises(stolon.InvalidArgumentError):
        rig.eng.register(obj, length)


# ------------------------------------------------------------------------------------------------
# regressions: each of these failed on an earlier build of the engine
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.eng.write(r.region, -1, r.dst, 0, 10, 1),
        lambda r: r.eng.write(r.region, 0, r.dst, -1, 10, 1),
        lambda r: r.eng.write(r.region, 0, r.dst, 0, -10, 1),
        lambda r: r.eng.write(r.region, 0, r.dst, 2**64, 1, 1),
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, -1),
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 2**32),
        lambda r: r.eng.write(r.region, 0, r.dst, 0, 10, 1, pin_domain=-1),
        lambda r: r.eng.write_paged(r.region, r.dst, 8, [-1], [0], imm=1),
        lambda r: r.eng.write_imm(r.peer.address, -5),
    ],
    ids=["neg-src", "neg-dst", "neg-len", "2**64-dst", "neg-imm", "imm-2**32", "neg-pin",
         "neg-page", "neg-imm-only"],
)  # fmt: skip
def test_out_of_range_integers_raise_stolon_errors(rig: Rig, call: Callable) -> None:
    """Every bad argument is a StolonError (OutOfBoundsError / InvalidArgumentError), so
    ``except stolon.StolonError`` catches it; nothing lands."""
    with nothing_lands(rig):
        with pytest.raises((stolon.OutOfBoundsError, stolon.InvalidArgumentError)):
            call(rig)


def test_huge_timeout_is_not_a_panic(rig: Rig) -> None:
    """A huge finite timeout either means "wait (practically) forever" or InvalidArgumentError."""
    f = rig.eng.write_imm(rig.peer.address, 0x99)
    f.wait(10)
    rig.peer.call("wait_imms", imms={str(0x99): 1}, timeout=10)
    calls = [
        lambda: f.wait(1e300),
        lambda: rig.eng.wait_imm(0x98, 0, timeout=1e300),
        lambda: rig.eng.write(rig.region, 0, rig.dst, 0, 1, timeout=1e300).wait(10),
    ]
    for call in calls:
        try:
            call()
        except stolon.InvalidArgumentError:
            pass
        except BaseException as e:  # noqa: B036 - a panic is a BaseException
            raise AssertionError(f"{type(e).__module__}.{type(e).__name__}: {e}") from None


def test_unregister_revokes_remote_access(peer_factory) -> None:
    """After the receiver unregisters a region, a write to its descriptor lands nothing."""
    eng = make_engine("tcp", 1, timeout=ENGINE_TIMEOUT)
    try:
        src = np.full(4096, 0xAB, dtype=np.uint8)
        region = eng.register(src)
        peer = peer_factory("tcp", 1, regions=(4096,))
        assert peer.call("unregister", region=0)["revoked"]
        with contextlib.suppress(stolon.TransferError):
            eng.write(region, 0, peer.descriptors[0], 0, 4096, 0x5E).wait(10)
        time.sleep(0.3)
        assert peer.call("imm_count", imms=[0x5E])["counts"] == {str(0x5E): 0}
        assert not np.asarray(peer.view(0)).any(), "bytes landed in an unregistered region"
    finally:
        eng.stop()


def test_message_larger_than_peer_buffers_is_not_lost_silently(peer_factory) -> None:
    eng = make_engine("tcp", 1, timeout=ENGINE_TIMEOUT)
    try:
        peer = peer_factory("tcp", 1, regions=(4096,), engine={"max_message_bytes": 4096})
        msg = bytes(range(256)) * 32  # 8192 bytes: fits the sender (64 KiB), not the receiver
        try:
            eng.send(peer.address, msg).wait(10)
        except (stolon.MessageTooLargeError, stolon.TransferError):
            return  # the sender was told: fine
        try:
            got = peer.recv_messages(1, timeout=3)
        except PeerError as e:
            raise AssertionError(f"send() succeeded but the peer got nothing ({e})") from None
        assert got == [msg], "the send succeeded, so the message must arrive whole"
    finally:
        eng.stop()


# ------------------------------------------------------------------------------------------------
# dead peers and stop()
# ------------------------------------------------------------------------------------------------


def _write_ok_or_transfer_error(fut, within: float) -> str:
    try:
        fut.wait(within)
        return "ok"
    except stolon.TransferError as e:  # includes TransferTimeoutError
        return type(e).__name__


def killed_peer_scenario(provider: str, small_writes: bool, max_op_bytes: int = 0) -> None:
    """Run in its own process by :func:`conftest.run_isolated` (an engine crash must not take
    pytest down). SIGKILLs the receiver while writes are in flight and checks that the parent's
    futures finish, that the engine stays usable and that a new peer then receives correctly."""
    big = 32 * MiB
    # The shm workaround needs injected operations: small ones, completing locally (a delivered
    # write waits for the target's response, which a dead peer never sends).
    extra = {"max_op_bytes": max_op_bytes, "completion": "local"} if max_op_bytes else {}
    eng = make_engine(provider, 2, timeout=ENGINE_TIMEOUT, min_shard_bytes=64 * KiB, **extra)
    peers = []
    try:
        src = np.random.default_rng(5).integers(0, 256, big, dtype=np.uint8)
        region = eng.register(src)
        peer = spawn_peer(provider, 2, regions=(big,))
        peers.append(peer)
        desc = peer.descriptors[0]
        f = eng.write(region, 0, desc, 0, MiB, 1)
        f.wait(10)
        peer.call("wait_imms", imms={"1": f.imm_count}, timeout=10)

        inflight = [eng.write(region, 0, desc, 0, big, 2) for _ in range(6)]
        inflight.append(eng.send(peer.address, b"in flight"))
        if small_writes:  # small enough to be injected, and immediate-only writes
            inflight += [eng.write(region, 0, desc, 100, 16, 3) for _ in range(4)]
            inflight += [eng.write_imm(peer.address, 3) for _ in range(4)]
            inflight.append(eng.write(region, 0, desc, 0, 0))
        peer.kill()
        t0 = time.monotonic()
        late = [eng.write(region, 0, desc, 0, big, 4) for _ in range(3)]
        if small_writes:
            late += [eng.write_imm(peer.address, 5), eng.write(region, 0, desc, 0, 8, 5)]
        outcomes = [_write_ok_or_transfer_error(f, ENGINE_TIMEOUT + 10) for f in inflight + late]
        print("outcomes after the kill:", outcomes, flush=True)
        assert all(f.done() for f in inflight + late)
        assert time.monotonic() - t0 < ENGINE_TIMEOUT + 10, "futures outlived the engine timeout"

        # Large writes to the dead peer cannot succeed: they fail within the timeout.
        t0 = time.monotonic()
        for fut in [eng.write(region, 0, desc, 0, MiB, 6), eng.write(region, 0, desc, 0, MiB)]:
            with pytest.raises(stolon.TransferError):
                fut.wait(ENGINE_TIMEOUT + 10)
        assert time.monotonic() - t0 < 2 * ENGINE_TIMEOUT + 10

        # The engine still works: a new process, at a new address.
        peer2 = spawn_peer(provider, 1, regions=(big,))
        peers.append(peer2)
        assert peer2.address != peer.address
        d2 = peer2.descriptors[0]
        fut = eng.write(region, 0, d2, 0, big, 7)
        fut.wait(30)
        peer2.call("wait_imms", imms={"7": fut.imm_count}, timeout=30)
        futs = [
            eng.write_paged(region, d2, 4096, [5, 1], [0, 2], imm=8),
            eng.write(region, 100, d2, big - 16, 16, 8),
            eng.write_imm(peer2.address, 8),
        ]
        for f in futs:
            f.wait(30)
        peer2.call("wait_imms", imms={"8": sum(f.imm_count for f in futs)}, timeout=30)
        expected = src.copy()
        expected[0:4096] = src[5 * 4096 : 6 * 4096]
        expected[2 * 4096 : 3 * 4096] = src[4096 : 2 * 4096]
        expected[big - 16 :] = src[100:116]
        digest = peer2.call("digest")["sha256"]
        assert digest == hashlib.sha256(expected.tobytes()).hexdigest(), "bytes at the new peer"
        assert peer2.call("imm_count", imms=[7, 8])["counts"] == {"7": 0, "8": 0}
        eng.send(peer2.address, b"alive").wait(10)
        assert peer2.recv_messages(1, timeout=10) == [b"alive"]
    finally:
        for p in peers:
            p.close()
        eng.stop()


SHM_WEDGED = pytest.mark.xfail(
    strict=True,
    reason="libfabric 1.17 shm: once a peer dies while a write over 4 KiB (CMA 'iov' protocol, "
    "completed by the peer's response) to it is in flight, that unanswered response blocks the "
    "endpoint's later responses (head-of-line; ofiwg/libfabric#9853), so every later write over "
    "4 KiB from the engine, even to a new live peer, times out. Workaround, tested below: "
    "max_op_bytes=4096 keeps every operation injected (no response), at about 1.4 GB/s instead "
    "of 10-19 GB/s",
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("provider", ["tcp", pytest.param("shm", marks=SHM_WEDGED)])
def test_peer_killed_mid_transfer(provider: str) -> None:
    """SIGKILL the receiver while large writes and a message are in flight: every future ends
    (ok, TransferError or TransferTimeoutError) within the engine's timeout, large writes to the
    dead peer fail, and a new peer process at a new address then receives correctly."""
    require_provider(provider)
    run_isolated("test_engine_errors", "killed_peer_scenario", provider, False, timeout=100)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "provider",
    [
        # Once a SIGSEGV inside fi_cq_read (tcp;ofi_rxm with injected writes): must not crash.
        "tcp",
        pytest.param("shm", marks=SHM_WEDGED),
    ],
)
def test_peer_killed_with_small_writes_in_flight(provider: str) -> None:
    """As above, with small and immediate-only writes in flight too: still no crash, no hang."""
    require_provider(provider)
    run_isolated("test_engine_errors", "killed_peer_scenario", provider, True, timeout=100)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("small_writes", [False, True])
def test_shm_with_injected_operations_survives_a_killed_peer(small_writes: bool) -> None:
    """The shm workaround: with every operation at most 4 KiB and local completion (injected, no
    response from the target), a peer killed mid-transfer leaves the engine working, as on
    tcp."""
    require_provider("shm")
    run_isolated(
        "test_engine_errors", "killed_peer_scenario", "shm", small_writes, 4096, timeout=100
    )


def test_transfer_timeout_error_says_how_long() -> None:
    """The error names the transfer's timeout (it once said 'timed out after 0ns')."""
    with make_engine("tcp", 1, timeout=ENGINE_TIMEOUT) as eng, make_engine("tcp", 1) as gone:
        addr = gone.address
        gone.stop()  # nobody listens there any more
        with pytest.raises(stolon.TransferTimeoutError) as info:
            eng.write_imm(addr, 1, timeout=0.5).wait(10)
        assert "0ns" not in str(info.value) and "500ms" in str(info.value), str(info.value)


def stop_scenario(with_immediates: bool) -> None:
    """Run in its own process by :func:`conftest.run_isolated`. stop() returns promptly; futures
    end in EngineStoppedError (or success); waits in other threads raise EngineStoppedError;
    afterwards every call raises EngineStoppedError; the peer is unharmed."""
    peer = spawn_peer("tcp", 2, regions=(64 * MiB,))
    try:
        _stop_scenario(peer, with_immediates)
    finally:
        peer.close()


def _stop_scenario(peer, with_immediates: bool) -> None:
    big = 64 * MiB
    eng = make_engine("tcp", 2, timeout=30.0, min_shard_bytes=64 * KiB)
    src = np.ones(big, dtype=np.uint8)
    region = eng.register(src)
    desc = peer.descriptors[0]
    eng.write_imm(peer.address, 1).wait(10)  # connected

    futs = [eng.write(region, 0, desc, 0, big, 2) for _ in range(8)]
    if with_immediates:  # immediate-only writes queued behind the large ones
        futs += [eng.write_imm(peer.address, 3) for _ in range(4)]
    callbacks: list = []
    for f in futs:
        f.add_done_callback(callbacks.append)
    outcomes: dict = {}

    def waiter(name: str, fn: Callable) -> threading.Thread:
        def run() -> None:
            try:
                fn()
                outcomes[name] = None
            except BaseException as e:  # noqa: B036 - record whatever ends the wait
                outcomes[name] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    threads = [
        waiter("wait_imm", lambda: eng.wait_imm(0x1234, 1, timeout=30)),
        waiter("recv", lambda: eng.recv(timeout=30)),
        waiter("future", futs[7].wait),
    ]
    stopped_waits = ["wait_imm", "recv"]
    if with_immediates:
        barrier = [eng.address, peer.address]
        threads.append(waiter("barrier", lambda: eng.barrier(barrier, 0x4321, timeout=30)))
        stopped_waits.append("barrier")
    expected_cb: list = []
    eng.expect_imm(0x2222, 1, expected_cb.append, timeout=30)
    time.sleep(0.2)
    t0 = time.monotonic()
    eng.stop()
    assert time.monotonic() - t0 < 5, "stop() must not wait for transfers"
    assert eng.stopped
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a wait did not end at stop()"
    for name in stopped_waits:
        assert isinstance(outcomes[name], stolon.EngineStoppedError), (name, outcomes[name])
    assert outcomes["future"] is None or isinstance(outcomes["future"], stolon.EngineStoppedError)
    for f in futs:
        assert f.done()
        exc = f.exception()
        assert exc is None or isinstance(exc, stolon.EngineStoppedError), exc
        with contextlib.suppress(stolon.EngineStoppedError):
            f.wait(0)
    deadline = time.monotonic() + 5
    while (len(callbacks) < len(futs) or not expected_cb) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(callbacks) == len(futs), "each done-callback runs once"
    assert all(c is None or isinstance(c, stolon.EngineStoppedError) for c in callbacks)
    assert len(expected_cb) == 1 and isinstance(expected_cb[0], stolon.EngineStoppedError)

    # After stop: everything says so, nothing hangs.
    after = [
        lambda: eng.write(region, 0, desc, 0, 10, 1),
        lambda: eng.write_imm(peer.address, 1),
        lambda: eng.write_paged(region, desc, 8, [0], [0], imm=1),
        lambda: eng.scatter(region, [(desc, 0, 0, 8)], 1),
        lambda: eng.send(peer.address, b"x"),
        lambda: eng.register(np.zeros(16, dtype=np.uint8)),
        lambda: eng.wait_imm(1, 1, timeout=5),
        lambda: eng.recv(timeout=5),
        lambda: eng.barrier([eng.address, peer.address], 3, timeout=5),
    ]
    for call in after:
        t0 = time.monotonic()
        with pytest.raises(stolon.EngineStoppedError):
            call()
        assert time.monotonic() - t0 < 2
    late_cb: list = []
    eng.expect_imm(5, 1, late_cb.append, timeout=1)
    deadline = time.monotonic() + 5
    while not late_cb and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(late_cb) == 1 and isinstance(late_cb[0], stolon.EngineStoppedError)
    eng.stop()  # idempotent
    # The peer is unharmed: it still answers and can be written by another engine.
    with make_engine("tcp", 1, timeout=10) as other:
        r = other.register(np.full(100, 9, dtype=np.uint8))
        f = other.write(r, 0, desc, 0, 100, 0xAA)
        f.wait(10)
        peer.call("wait_imms", imms={str(0xAA): f.imm_count}, timeout=10)
        assert np.all(peer.view(0)[:100] == 9)


@pytest.mark.timeout(90)
def test_stop_with_transfers_in_flight() -> None:
    require_provider("tcp")
    run_isolated("test_engine_errors", "stop_scenario", False, timeout=80)


@pytest.mark.timeout(90)
def test_stop_with_writes_and_immediates_in_flight() -> None:
    """Once a SIGSEGV inside libfabric at shutdown (tcp;ofi_rxm with injected writes queued)."""
    require_provider("tcp")
    run_isolated("test_engine_errors", "stop_scenario", True, timeout=80)


def test_context_manager_stops() -> None:
    with make_engine("tcp", 1) as eng:
        assert not eng.stopped
    assert eng.stopped
    with pytest.raises(stolon.EngineStoppedError):
        eng.register(bytearray(8))
