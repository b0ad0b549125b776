"""The engine between two real processes on loopback, over tcp, shm and (small) udp.

The parent process writes into a child process (``tests/peer.py``) with every kind of operation
and checks, per random batch: every byte of the child's regions equals the image computed here,
every immediate arrived exactly as often as the counting functions promised (no more), every
sender future succeeded with the promised ``imm_counts``, and the stats add up. The child maps its
regions from files that the parent maps read-only, so whole regions are compared in place.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pytest
from conftest import PeerProcess, make_engine, require_provider, spawn_peer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import stolon

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
KiB = 1 << 10


@dataclass(frozen=True)
class Profile:
    """How hard to push one provider."""

    max_len: int  # longest single write
    max_domains: int
    main: int  # size of the child's main region (the parent's source has the same size)
    aux: int  # size of each of the child's two extra regions
    max_msg: int  # longest control message in a batch
    # Writes without an immediate, and engines that cut writes into many small ops, in the random
    # batches.
    imm_optional: bool = True
    small_ops: bool = True


PROFILES = {
    "tcp": Profile(max_len=64 * MiB, max_domains=4, main=68 * MiB, aux=1 * MiB, max_msg=64 * KiB),
    "shm": Profile(
        max_len=64 * MiB,
        max_domains=4,
        main=68 * MiB,
        aux=1 * MiB,
        max_msg=64 * KiB,
    ),
    # udp;ofi_rxd is slow and retransmits: small workloads only.
    "udp": Profile(max_len=192 * KiB, max_domains=2, main=1 * MiB, aux=256 * KiB, max_msg=4 * KiB),
}

#: Multiplies the number of random examples (e.g. STOLON_TEST_SCALE=10 for a longer soak).
SCALE = max(float(os.environ.get("STOLON_TEST_SCALE", "1")), 0.1)
SMALL_MAX_OP = 256 * KiB  # engines built with this split every op into <= 256 KiB pieces
MIN_SHARD = 64 * KiB  # the floor: writes of >= 128 KiB are sharded over the domains
TIMEOUT = 30.0


def _region_sizes(p: Profile) -> tuple:
    return (p.main, p.aux, p.aux)


class Lab:
    """Parent engines and child processes, made on first use and kept for the module."""

    def __init__(self) -> None:
        self.engines: dict = {}
        self.peers: dict = {}
        self.srcs: dict = {}
        self.base: dict = {}
        self.examples = 0

    def source(self, provider: str) -> np.ndarray:
        if provider not in self.srcs:
            n = PROFILES[provider].main
            self.base[provider] = np.random.default_rng(12345).integers(
                0, 256, size=n, dtype=np.uint8
            )
            self.srcs[provider] = self.base[provider].copy()
        return self.srcs[provider]

    def engine(self, provider: str, domains: int, small_ops: bool = False):
        """(engine, region over the source buffer, receive buffer, its region)."""
        key = (provider, domains, small_ops)
        if key not in self.engines:
            eng = make_engine(
                provider,
                domains,
                timeout=TIMEOUT,
                min_shard_bytes=MIN_SHARD,
                max_op_bytes=SMALL_MAX_OP if small_ops else None,
            )
            recv = np.zeros(2 * MiB, dtype=np.uint8)
            self.engines[key] = (eng, eng.register(self.source(provider)), recv, eng.register(recv))
        return self.engines[key]

    def peer(self, provider: str, domains: int) -> PeerProcess:
        key = (provider, domains)
        p = self.peers.get(key)
        if p is None or not p.alive():
            if p is not None:
                p.close()  # it died (a failed example): reap it and remove its files
            p = spawn_peer(provider, domains, regions=_region_sizes(PROFILES[provider]))
            self.peers[key] = p
        return p

    def discard(self, provider: str, b: Batch) -> None:
        """Drops the engine and peer of a failed example, so leftovers (uncounted immediates,
        unread messages, late writes) cannot leak into the next example while hypothesis
        shrinks: the next example gets fresh ones."""
        p = self.peers.pop((provider, b.n_child), None)
        if p is not None:
            p.close()
        e = self.engines.pop((provider, b.n_parent, b.small_ops), None)
        if e is not None:
            e[0].stop()

    def close(self) -> None:
        for p in self.peers.values():
            p.close()
        for eng, *_ in self.engines.values():
            eng.stop()


@pytest.fixture(scope="module")
def lab():
    lab = Lab()
    yield lab
    lab.close()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def assert_image(view: np.ndarray, expected: np.ndarray, what: str, timeout: float = 10.0) -> None:
    """Every byte equal. Writes without an immediate may land just after their local completion,
    so the comparison is retried for a while before it fails."""
    deadline = time.monotonic() + timeout
    while True:
        if np.array_equal(view, expected):
            return
        if time.monotonic() > deadline:
            diff = np.flatnonzero(view != expected)
            first = diff[:8].tolist()
            raise AssertionError(
                f"{what}: {diff.size} of {expected.size} bytes differ, first at {first}: "
                f"got {view[diff[:8]].tolist()} want {expected[diff[:8]].tolist()}"
            )
        time.sleep(0.02)


def shard_kw(sharding: Any) -> dict:
    if sharding is None:
        return {}
    if sharding == "round_robin":
        return {"sharding": "round_robin"}
    return {"pin_domain": sharding}


def sum_stat(eng, key: str) -> int:
    return sum(d[key] for d in eng.stats())


class CallbackLog:
    """Records done-callbacks of futures (they run on the engine's callback thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list = []

    def make(self, tag: Any):
        def cb(exc: Optional[BaseException]) -> None:
            with self.lock:
                self.calls.append((tag, exc))

        return cb

    def wait_for(self, n: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.calls) >= n:
                    break
            time.sleep(0.005)
        time.sleep(0.02)  # let a wrong extra call show up
        with self.lock:
            return list(self.calls)


# ------------------------------------------------------------------------------------------------
# random batches
# ------------------------------------------------------------------------------------------------

IMMS = st.one_of(st.sampled_from([0, 1, 7, 0xFFFFFFFF]), st.integers(0, 2**32 - 1))
OPT_IMM = st.one_of(st.none(), IMMS)
KINDS = ["write", "write", "write", "write_imm", "paged", "scatter", "send", "child_send"]


@dataclass
class Batch:
    n_parent: int
    n_child: int
    small_ops: bool
    ops: list = field(default_factory=list)
    # (region, footprint, op index, item index or None) of every destination range
    slots: list = field(default_factory=list)


def draw_len(data, cap: int, max_len: int) -> int:
    """0..cap bytes, mostly small, sometimes up to the profile's largest write (each size tier
    has a floor: hypothesis favours the low end of a range)."""
    cap = min(cap, max_len)
    tier = data.draw(st.sampled_from([0, 0, 1, 1, 2, 2, 3, 4]), label="size tier")
    lo, hi = (
        (0, 64),
        (65, 8 * KiB),
        (8 * KiB, 1 * MiB),
        (1 * MiB, max_len),
        (max_len // 2, max_len),
    )[tier]
    if cap < lo:
        return data.draw(st.integers(0, cap), label="length")
    return data.draw(st.integers(lo, min(hi, cap)), label="length")


def draw_sharding(data, n: int) -> Any:
    how = data.draw(st.sampled_from(["default", "round_robin", "pin"]), label="sharding")
    if how == "default":
        return None
    if how == "round_robin":
        return "round_robin"
    return data.draw(st.integers(0, n - 1), label="pin_domain")


def draw_batch(data, p: Profile) -> Batch:
    b = Batch(
        n_parent=data.draw(st.integers(1, p.max_domains), label="parent domains"),
        n_child=data.draw(st.integers(1, p.max_domains), label="child domains"),
        small_ops=p.small_ops and data.draw(st.booleans(), label="small max_op_bytes"),
    )
    sizes = _region_sizes(p)
    budget = list(sizes)
    src_len = p.main
    region_st = st.sampled_from([0, 0, 0, 1, 2])
    opt_imm = OPT_IMM if p.imm_optional else IMMS
    for i in range(data.draw(st.integers(1, 7), label="ops")):
        kind = data.draw(st.sampled_from(KINDS), label="kind")
        if kind == "write":
            r = data.draw(region_st, label="region")
            n = draw_len(data, budget[r], p.max_len)
            budget[r] -= n
            op = {
                "kind": kind,
                "region": r,
                "length": n,
                "src_offset": data.draw(st.integers(0, src_len - n), label="src_offset"),
                "imm": data.draw(opt_imm, label="imm"),
                "sharding": draw_sharding(data, b.n_parent),
            }
            b.slots.append((r, n, i, None))
        elif kind == "write_imm":
            op = {"kind": kind, "imm": data.draw(IMMS, label="imm"), "times": 1}
        elif kind == "paged":
            r = data.draw(region_st, label="region")
            page = data.draw(st.integers(0, min(64 * KiB, budget[r])), label="page_bytes")
            dst_extra = data.draw(st.sampled_from([0, 0, 1, 100, 4096]), label="dst gap")
            src_extra = data.draw(st.sampled_from([0, 0, 3, 512, 4096]), label="src gap")
            dst_stride = max(page + dst_extra, 1)
            src_stride = max(page + src_extra, 1)
            src_offset = data.draw(st.integers(0, 4096), label="paged src_offset")
            most_dst = min((budget[r] - page) // dst_stride, 63)
            most_src = min((src_len - src_offset - page) // src_stride, 255)
            k = data.draw(st.integers(0, min(12, most_dst + 1)), label="pages")
            dst_pages = data.draw(
                st.lists(st.integers(0, most_dst), min_size=k, max_size=k, unique=True),
                label="dst pages",
            )
            src_pages = data.draw(
                st.lists(st.integers(0, most_src), min_size=k, max_size=k), label="src pages"
            )
            foot = max(dst_pages) * dst_stride + page if k else 0
            budget[r] -= foot
            op = {
                "kind": kind,
                "region": r,
                "page_bytes": page,
                "src_pages": src_pages,
                "dst_pages": dst_pages,
                "src_stride": src_stride if src_extra else None,
                "dst_stride": dst_stride if dst_extra else None,
                "src_offset": src_offset,
                "imm": data.draw(opt_imm, label="imm"),
                "sharding": draw_sharding(data, b.n_parent),
            }
            b.slots.append((r, foot, i, None))
        elif kind == "scatter":
            items = []
            for j in range(data.draw(st.integers(0, 5), label="items")):
                r = data.draw(region_st, label="region")
                n = draw_len(data, min(budget[r], 8 * MiB), p.max_len)
                budget[r] -= n
                src_off = data.draw(st.integers(0, src_len - n), label="src_offset")
                items.append({"region": r, "length": n, "src_offset": src_off})
                b.slots.append((r, n, i, j))
            op = {
                "kind": kind,
                "items": items,
                "imm": data.draw(opt_imm, label="imm"),
                "sharding": draw_sharding(data, b.n_parent),
            }
        else:  # send / child_send: control messages, each way
            lens = data.draw(
                st.lists(
                    st.one_of(st.integers(0, 64), st.integers(0, p.max_msg)),
                    min_size=1,
                    max_size=4,
                ),
                label="message lengths",
            )
            seed = data.draw(st.integers(0, 2**32 - 1), label="message seed")
            rng = np.random.default_rng(seed)
            op = {"kind": kind, "messages": [rng.bytes(n) for n in lens]}
        b.ops.append(op)
    # Lay the destination ranges out in each region: a random order and random gaps, so ranges
    # never overlap (concurrent writes to one byte have no defined result) but start anywhere.
    for r, size in enumerate(sizes):
        mine = [s for s in b.slots if s[0] == r]
        slack = size - sum(s[1] for s in mine)
        assert slack >= 0
        order = data.draw(st.permutations(range(len(mine))), label="layout order")
        pos = 0
        for idx in order:
            _, foot, i, j = mine[idx]
            gap = data.draw(st.integers(0, slack), label="gap")
            slack -= gap
            pos += gap
            target = b.ops[i] if j is None else b.ops[i]["items"][j]
            target["dst_offset"] = pos
            pos += foot
    return b


def _bucket(n: int) -> str:
    for limit, name in ((32 * MiB, "32 MiB"), (1 * MiB, "1 MiB"), (64 * KiB, "64 KiB")):
        if n >= limit:
            return name
    return "0 B"


def run_batch(lab: Lab, provider: str, b: Batch) -> None:
    p = PROFILES[provider]
    eng, src_region, _, _ = lab.engine(provider, b.n_parent, b.small_ops)
    peer = lab.peer(provider, b.n_child)
    descs = peer.descriptors
    lab.examples += 1
    k = lab.examples
    # Fresh contents on both sides, so a write that did not happen cannot look as if it did.
    src = lab.source(provider)
    np.add(lab.base[provider], np.uint8(k % 251), out=src)
    fill = (k * 37 + 11) % 256
    for r in range(3):
        peer.call("fill", region=r, value=fill)
    expected = [np.full(s, fill, dtype=np.uint8) for s in _region_sizes(p)]

    sent_before = {key: sum_stat(eng, key) for key in ("bytes_written", "write_ops")}
    sent_before["messages_sent"] = sum_stat(eng, "messages_sent")
    imms_before = peer.stats_sum("imms_received")

    futures: list = []  # (future, expected imm_counts, what)
    imm_totals: dict = {}
    bytes_total = 0
    ops_total = 0
    to_child: list = []
    to_parent: list = []
    child_send_ids: list = []

    def expect_imm(imm: Optional[int], n: int) -> None:
        if imm is not None and n:
            imm_totals[imm] = imm_totals.get(imm, 0) + n

    for i, op in enumerate(b.ops):
        kind = op["kind"]
        if kind == "write":
            n, so, do, r = op["length"], op["src_offset"], op["dst_offset"], op["region"]
            kw = shard_kw(op["sharding"])
            count = eng.imm_count_write(n, **kw)
            f = eng.write(src_region, so, descs[r], do, n, op["imm"], **kw)
            futures.append((f, [count if op["imm"] is not None else 0], f"op {i}: {op}"))
            expect_imm(op["imm"], count)
            expected[r][do : do + n] = src[so : so + n]
            bytes_total += n
            ops_total += count
        elif kind == "write_imm":
            f = eng.write_imm(peer.address, op["imm"])
            futures.append((f, [1], f"op {i}: {op}"))
            expect_imm(op["imm"], 1)
            ops_total += 1
        elif kind == "paged":
            r, page = op["region"], op["page_bytes"]
            s_stride = op["src_stride"] or page
            d_stride = op["dst_stride"] or page
            pages = len(op["src_pages"])
            count = eng.imm_count_paged(pages, page)
            f = eng.write_paged(
                src_region,
                descs[r],
                page,
                op["src_pages"],
                op["dst_pages"],
                src_stride=op["src_stride"],
                dst_stride=op["dst_stride"],
                src_offset=op["src_offset"],
                dst_offset=op["dst_offset"],
                imm=op["imm"],
                **shard_kw(op["sharding"]),
            )
            futures.append((f, [count if op["imm"] is not None else 0], f"op {i}: {op}"))
            expect_imm(op["imm"], count)
            for s, d in zip(op["src_pages"], op["dst_pages"]):
                so = op["src_offset"] + s * s_stride
                do = op["dst_offset"] + d * d_stride
                expected[r][do : do + page] = src[so : so + page]
            bytes_total += pages * page
            ops_total += count
        elif kind == "scatter":
            items = []
            per_dest: dict = {}  # region -> imm count, in first-appearance order
            for it in op["items"]:
                r, n, so, do = it["region"], it["length"], it["src_offset"], it["dst_offset"]
                items.append((descs[r], so, do, n))
                c = eng.imm_count_scatter_item(n, **shard_kw(op["sharding"]))
                per_dest[r] = per_dest.get(r, 0) + c
                expected[r][do : do + n] = src[so : so + n]
                bytes_total += n
                ops_total += c
            f = eng.scatter(src_region, items, op["imm"], **shard_kw(op["sharding"]))
            want = [c if op["imm"] is not None else 0 for c in per_dest.values()]
            futures.append((f, want, f"op {i}: {op}"))
            expect_imm(op["imm"], sum(per_dest.values()))
        elif kind == "send":
            for m in op["messages"]:
                futures.append((eng.send(peer.address, m), [0], f"op {i}: send {len(m)} B"))
                to_child.append(m)
        elif kind == "child_send":
            data = [base64.b64encode(m).decode() for m in op["messages"]]
            child_send_ids.append(
                peer.submit("send", address=eng.address.to_text(), data=data, timeout=TIMEOUT)
            )
            to_parent.extend(op["messages"])

    # Sender side: every future succeeds and says how many immediates it produces.
    log = CallbackLog()
    for idx, (f, _, _) in enumerate(futures):
        f.add_done_callback(log.make(idx))
    for f, want, what in futures:
        try:
            f.wait(TIMEOUT)
        except stolon.StolonError as e:
            raise AssertionError(
                f"{what}: {type(e).__name__}: {e}; peer alive: {peer.alive()}; sender stats: "
                f"{eng.stats()}; peer stderr: {peer.stderr_tail(800)}"
            ) from e
        assert f.done() and f.exception() is None, what
        assert f.imm_counts == want, f"{what}: imm_counts {f.imm_counts} != {want}"
        assert f.imm_count == sum(want), what
    calls = log.wait_for(len(futures))
    assert sorted(t for t, _ in calls) == list(range(len(futures))), "each callback runs once"
    assert all(exc is None for _, exc in calls)
    for rid in child_send_ids:
        peer.result(rid, timeout=TIMEOUT + 5)

    # Receiver side: each immediate arrived exactly as often as promised.
    if imm_totals:
        left = peer.call("wait_imms", imms={str(k): v for k, v in imm_totals.items()})["left"]
        assert all(v == 0 for v in left.values()), f"extra immediates arrived: {left}"
    got = peer.recv_messages(len(to_child)) if to_child else []
    assert sorted(got) == sorted(to_child), "messages to the child"
    got = [eng.recv(timeout=TIMEOUT) for _ in to_parent]
    assert sorted(got) == sorted(to_parent), "messages to the parent"

    # Every byte of every region of the child.
    for r in range(3):
        assert_image(peer.view(r), expected[r], f"{provider} child region {r}")

    # Nothing extra arrived meanwhile, and the counters add up.
    left = peer.call("imm_count", imms=list(imm_totals))["counts"]
    assert all(v == 0 for v in left.values()), f"late extra immediates: {left}"
    assert peer.stats_sum("imms_received") - imms_before == sum(imm_totals.values())
    assert sum_stat(eng, "bytes_written") - sent_before["bytes_written"] == bytes_total
    assert sum_stat(eng, "write_ops") - sent_before["write_ops"] == ops_total
    assert sum_stat(eng, "messages_sent") - sent_before["messages_sent"] == len(to_child)


def _batch_test(provider: str, examples: int):
    @settings(
        max_examples=max(int(examples * SCALE), 1),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=st.data())
    def test(lab: Lab, data) -> None:
        b = draw_batch(data, PROFILES[provider])
        largest = max((s[1] for s in b.slots), default=0)
        event(f"{provider}: largest destination range >= {_bucket(largest)}")
        event(f"{provider}: parent {b.n_parent} / child {b.n_child} domains")
        try:
            run_batch(lab, provider, b)
        except BaseException:
            lab.discard(provider, b)
            raise

    test.__name__ = f"test_random_batches_{provider}"
    test.__doc__ = f"Random batches of every op kind, parent -> child process, over {provider}."
    return test


test_random_batches_tcp = _batch_test("tcp", 30)
test_random_batches_shm = _batch_test("shm", 30)
test_random_batches_udp = _batch_test("udp", 8)


@pytest.mark.parametrize(
    "provider,n_parent,n_child,small_ops",
    [("tcp", 4, 3, False), ("tcp", 3, 1, True), ("shm", 4, 2, True), ("shm", 1, 4, False)],
)
def test_large_writes(lab: Lab, provider: str, n_parent: int, n_child: int, small_ops: bool):
    """The largest sizes, every time: 64 MiB at odd offsets (sharded over every domain, and cut
    into 256 KiB ops on the small_ops engines), a pinned 40 MiB write, a 2 x 12 MiB scatter."""
    b = Batch(n_parent=n_parent, n_child=n_child, small_ops=small_ops)
    b.ops = [
        {
            "kind": "write",
            "region": 0,
            "length": 64 * MiB,
            "src_offset": 1,
            "dst_offset": 4 * MiB - 3,
            "imm": 0x64,
            "sharding": None,
        },
    ]
    b.slots = [(0, 64 * MiB, 0, None)]
    run_batch(lab, provider, b)
    b.ops = [
        {
            "kind": "write",
            "region": 0,
            "length": 40 * MiB + 5,
            "src_offset": 28 * MiB - 5,
            "dst_offset": 7,
            "imm": 0x40,
            "sharding": n_parent - 1,
        },
        {
            "kind": "scatter",
            "imm": 0x12,
            "sharding": "round_robin",
            "items": [
                {"region": 0, "length": 12 * MiB, "src_offset": 3, "dst_offset": 41 * MiB},
                {"region": 0, "length": 12 * MiB + 1, "src_offset": 0, "dst_offset": 54 * MiB},
                {"region": 1, "length": PROFILES[provider].aux, "src_offset": 9, "dst_offset": 0},
            ],
        },
    ]
    b.slots = [(0, 40 * MiB + 5, 0, None), (0, 12 * MiB + 1, 1, 0)]
    run_batch(lab, provider, b)


@pytest.mark.parametrize("provider", ["tcp", "shm"])
@settings(
    max_examples=max(int(6 * SCALE), 1),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_child_writes_into_parent(lab: Lab, provider: str, data) -> None:
    """The other direction: the child writes from its memory, the parent counts and checks."""
    n = data.draw(st.integers(1, 4), label="domains")
    eng, _, recv, recv_region = lab.engine(provider, n)
    peer = lab.peer(provider, data.draw(st.integers(1, 4), label="child domains"))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    peer.call("fill", region=1, seed=seed)
    child_src = np.array(peer.view(1))
    fill = data.draw(st.integers(0, 255), label="fill")
    recv[:] = fill
    expected = recv.copy()
    imm = data.draw(IMMS, label="imm")
    # Disjoint destination ranges, laid out left to right with random gaps.
    pos, total = 0, 0
    for _ in range(data.draw(st.integers(1, 4), label="writes")):
        room = recv.size - pos
        n_bytes = data.draw(st.integers(0, min(room, child_src.size)), label="length")
        gap = data.draw(st.integers(0, room - n_bytes), label="gap")
        so = data.draw(st.integers(0, child_src.size - n_bytes), label="src_offset")
        do = pos + gap
        r = peer.call(
            "write",
            region=1,
            dst=recv_region.descriptor.to_text(),
            src_offset=so,
            dst_offset=do,
            length=n_bytes,
            imm=imm,
        )
        assert r["imm_counts"] == [r["promised"]]
        total += r["imm_count"]
        expected[do : do + n_bytes] = child_src[so : so + n_bytes]
        pos = do + n_bytes
    eng.wait_imm(imm, total, timeout=TIMEOUT)
    assert eng.imm_count(imm) == 0
    assert_image(recv, expected, "parent receive buffer")
    digest = peer.call("digest", region=1)["sha256"]
    assert digest == hashlib.sha256(child_src.tobytes()).hexdigest(), "the source is unchanged"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "provider",
    ["tcp", "shm"],
)
def test_many_op_write_beside_a_write_without_immediate(provider: str) -> None:
    """A 32 MiB write cut into 256 KiB ops, with an immediate, next to a small write without
    one, 30 rounds: the receiver survives, counts exactly and gets every byte."""
    require_provider(provider)
    big, small = 32 * MiB, 2966
    with make_engine(provider, 1, timeout=TIMEOUT, max_op_bytes=SMALL_MAX_OP) as eng:
        src = np.random.default_rng(11).integers(0, 256, big + small, dtype=np.uint8)
        region = eng.register(src)
        peer = spawn_peer(provider, 1, regions=(big + small,))
        try:
            desc = peer.descriptors[0]
            for rnd in range(30):
                f1 = eng.write(region, 0, desc, small, big, 0xB16)
                f2 = eng.write(region, big, desc, 0, small)
                f1.wait(TIMEOUT)
                f2.wait(TIMEOUT)
                assert f1.imm_count == eng.imm_count_write(big) == big // SMALL_MAX_OP
                left = peer.call("wait_imms", imms={str(0xB16): f1.imm_count})["left"]
                assert left == {str(0xB16): 0}, f"round {rnd}"
            expected = np.concatenate([src[big:], src[:big]])
            assert_image(peer.view(0), expected, f"{provider} receiver")
        finally:
            peer.close()


# ------------------------------------------------------------------------------------------------
# barrier, messages, expect_imm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_barrier_between_processes(lab: Lab, provider: str) -> None:
    eng = lab.engine(provider, 2)[0]
    peer = lab.peer(provider, 2)
    members = [eng.address.to_text(), peer.address.to_text()]
    for rnd in range(3):  # the same immediate can be reused round after round
        rid = peer.submit("barrier", addresses=members, imm=0xBA77, timeout=20)
        eng.barrier([eng.address, peer.address], 0xBA77, timeout=20)
        peer.result(rid, timeout=30)
        assert eng.imm_count(0xBA77) == 0, f"round {rnd}"
    assert peer.call("imm_count", imms=[0xBA77])["counts"] == {str(0xBA77): 0}
    # Alone, the barrier times out: the peer never arrives.
    t0 = time.monotonic()
    with pytest.raises(stolon.TransferTimeoutError):
        eng.barrier([eng.address, peer.address], 0xBA78, timeout=0.5)
    assert time.monotonic() - t0 < 5
    # A barrier of one is immediate.
    eng.barrier([eng.address], 0xBA79, timeout=1)


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_messages_both_ways(lab: Lab, provider: str) -> None:
    eng = lab.engine(provider, 3)[0]
    peer = lab.peer(provider, 1)
    rng = np.random.default_rng(7)
    out = [b"", b"x", rng.bytes(65536), *(rng.bytes(int(n)) for n in rng.integers(0, 5000, 20))]
    futs = [eng.send(peer.address, m) for m in out]
    for f in futs:
        f.wait(TIMEOUT)
        assert f.imm_counts == [0]
    assert sorted(peer.recv_messages(len(out))) == sorted(out)
    back = [rng.bytes(int(n)) for n in rng.integers(0, 3000, 10)]
    peer.send_messages(eng.address, back)
    assert sorted(eng.recv(timeout=TIMEOUT) for _ in back) == sorted(back)
    with pytest.raises(stolon.TransferTimeoutError):
        eng.recv(timeout=0.05)
    # With a callback, messages go to it instead of recv().
    got: list = []
    done = threading.Event()

    def on_msg(m: bytes) -> None:
        got.append(m)
        if len(got) == len(back):
            done.set()

    eng.on_message(on_msg)
    try:
        peer.send_messages(eng.address, back)
        assert done.wait(TIMEOUT)
        assert sorted(got) == sorted(back)
        with pytest.raises(stolon.TransferTimeoutError):
            eng.recv(timeout=0.05)
    finally:
        eng.on_message(None)
    peer.send_messages(eng.address, [b"after"])
    assert eng.recv(timeout=TIMEOUT) == b"after"


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_expect_imm_callback_fires_once(lab: Lab, provider: str) -> None:
    eng, src_region, _, _ = lab.engine(provider, 2)
    peer = lab.peer(provider, 2)
    imm = 0xE1
    peer.call("expect_imm", imm=imm, count=3, tag="three", timeout=20)
    peer.call("expect_imm", imm=0xE2, count=1, tag="never", timeout=0.3)
    eng.write_imm(peer.address, imm).wait(TIMEOUT)
    eng.write(src_region, 0, peer.descriptors[1], 0, 100, imm).wait(TIMEOUT)
    time.sleep(0.1)
    early = peer.call("expect_results")["results"]
    assert all(r["tag"] != "three" for r in early), f"fired after 2 of 3 arrivals: {early}"
    eng.write_imm(peer.address, imm).wait(TIMEOUT)  # the third arrival
    eng.write_imm(peer.address, imm).wait(TIMEOUT)  # one more: counted, not given to the callback
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        res = peer.call("expect_results")["results"]
        if len(res) >= 2:
            break
        time.sleep(0.02)
    time.sleep(0.2)
    res = peer.call("expect_results")["results"]
    assert sorted((r["tag"], r["error"]) for r in res) == [
        ("never", "TransferTimeoutError"),
        ("three", None),
    ], res
    peer.call("wait_imms", imms={str(imm): 1}, timeout=10)
    assert peer.call("imm_count", imms=[imm, 0xE2])["counts"] == {str(imm): 0, str(0xE2): 0}


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["tcp", "udp"])
def test_interfaces_selects_that_interface(provider: str) -> None:
    """``interfaces=["lo"]`` must open the domain on ``lo`` (or fail with ProviderNotFoundError),
    never silently on another interface."""
    require_provider(provider)
    if not any(d["domain"] == "lo" for d in stolon.list_providers(provider)):
        pytest.skip(f"{provider} lists no 'lo' domain here")
    with stolon.TransferEngine(provider, 1, interfaces=["lo"]) as eng:
        assert [d["domain"] for d in eng.domain_info()] == ["lo"]
