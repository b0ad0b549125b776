"""Multi-NIC sharding and fault tolerance across network namespaces joined by veth pairs.

Engines run in two namespaces with one domain per veth (scripts/netns_testbed.py); needs root
and iproute2, and skips with the reason otherwise. The workloads live in
benchmarks/multinic.py (shared with the benchmark and the soak command).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))

import multinic  # noqa: E402
import netns_testbed  # noqa: E402

MiB = 1 << 20
ok, why = netns_testbed.available()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(not ok, reason=f"network-namespace testbed unavailable: {why}"),
]


def single(desc: str, src: int, dst_off: int, length: int, imm: int, **kw) -> dict:
    return {
        "kind": "single",
        "src": src,
        "dst": desc,
        "dst_off": dst_off,
        "len": length,
        "imm": imm,
        **kw,
    }


@pytest.mark.timeout(120)
def test_each_link_carries_its_share() -> None:
    with netns_testbed.Testbed(4) as tb:
        a, b = multinic.pair(tb, [64 * MiB], [64 * MiB])
        try:
            a.call(cmd="fill", seed=3)
            res = a.call(cmd="batch", ops=[single(b.descriptors[0], 0, 0, 64 * MiB, 1)])
            assert "error" not in res["results"][0]
            n = sum(res["results"][0]["imm_counts"])
            assert n == 4
            assert b.call(cmd="wait_imms", imms={"1": n})["left"] == {"1": 0}
            per_link = [s["bytes_written"] for s in a.call(cmd="stats")["stats"]]
            assert per_link == [16 * MiB] * 4
            assert [s["imms_received"] for s in b.call(cmd="stats")["stats"]] == [1, 1, 1, 1]
            src = np.random.default_rng(3).integers(0, 256, 64 * MiB, np.uint8)
            assert np.array_equal(b.view(), src)
        finally:
            a.close()
            b.close()


@pytest.mark.timeout(180)
def test_a_link_going_down_fails_only_the_affected_transfer() -> None:
    size = 48 * MiB
    with netns_testbed.Testbed(2, rates_mbit=[200, 200]) as tb:
        a, b = multinic.pair(tb, [size], [size], timeout=3.0)
        try:
            a.call(cmd="fill", seed=5)
            b.call(cmd="fill", seed=6)
            before = np.array(b.view())
            off, length = 4 * MiB, 24 * MiB  # ~0.5 s per link at 200 Mbit/s
            a.send(cmd="batch", ops=[single(b.descriptors[0], 0, off, length, 1)], timeout=30)
            time.sleep(0.15)
            tb.link_down(1)
            t0 = time.monotonic()
            res = a.reply(timeout=60)["results"][0]
            assert res.get("error") in ("TransferTimeoutError", "TransferError"), res
            assert time.monotonic() - t0 < 3.0 + 5.0, "the failure outlived the timeout"
            now = np.array(b.view())
            assert np.array_equal(now[:off], before[:off])
            assert np.array_equal(now[off + length :], before[off + length :])
            # The remaining link still works.
            r = a.call(cmd="batch", ops=[single(b.descriptors[0], 0, 0, MiB, 2, pin_domain=0)])
            assert "error" not in r["results"][0], r
            assert b.call(cmd="wait_imms", imms={"2": 1})["left"] == {"2": 0}
            # After the link returns, transfers over both links succeed again.
            tb.link_up(1)
            op = single(b.descriptors[0], 0, 0, 8 * MiB, 3, timeout=60.0)
            r = a.call(cmd="batch", ops=[op], timeout=90)
            assert "error" not in r["results"][0], r
            n = sum(r["results"][0]["imm_counts"])
            assert b.call(cmd="wait_imms", imms={"3": n}, timeout=60)["left"] == {"3": 0}
            src = np.random.default_rng(5).integers(0, 256, size, np.uint8)
            assert np.array_equal(np.array(b.view())[: 8 * MiB], src[: 8 * MiB])
        finally:
            a.close()
            b.close()


@pytest.mark.timeout(180)
def test_a_killed_peer_gives_errors_and_a_new_peer_is_reachable() -> None:
    size = 32 * MiB
    with netns_testbed.Testbed(2, rates_mbit=[400, 400]) as tb:
        a, b = multinic.pair(tb, [size], [size], timeout=3.0)
        b2 = None
        try:
            a.call(cmd="fill", seed=8)
            ops = [single(b.descriptors[0], 0, 0, size, 1) for _ in range(3)]
            a.send(cmd="batch", ops=ops, timeout=30)
            time.sleep(0.3)
            b.kill()
            t0 = time.monotonic()
            res = a.reply(timeout=60)["results"]
            assert time.monotonic() - t0 < 3.0 + 5.0
            assert any("error" in r for r in res), res
            b2 = multinic.Agent(tb, "b", [ln.ip_b for ln in tb.links], [size])
            assert b2.address != b.address
            r = a.call(cmd="batch", ops=[single(b2.descriptors[0], 0, 0, size, 2)])
            assert "error" not in r["results"][0], r
            n = sum(r["results"][0]["imm_counts"])
            assert b2.call(cmd="wait_imms", imms={"2": n})["left"] == {"2": 0}
            src = np.random.default_rng(8).integers(0, 256, size, np.uint8)
            assert np.array_equal(b2.view(), src)
        finally:
            a.close()
            b.close()
            if b2 is not None:
                b2.close()


@pytest.mark.timeout(240)
def test_unequal_links_complete_out_of_posting_order_and_everything_lands() -> None:
    size = 16 * MiB
    with netns_testbed.Testbed(3, rates_mbit=[800, 800, 80]) as tb:
        a, b = multinic.pair(tb, [size], [size], min_shard_bytes=256 << 10)
        try:
            a.call(cmd="fill", seed=9)
            desc = b.descriptors[0]
            # Posted first on the slow link, second on a fast one.
            slow = single(desc, 0, 0, 4 * MiB, 1, pin_domain=2)
            fast = single(desc, 0, 8 * MiB, 64 << 10, 2, pin_domain=0)
            a.send(cmd="batch", ops=[slow, fast], timeout=60)
            assert b.call(cmd="wait_imms", imms={"2": 1}, timeout=30)["left"] == {"2": 0}
            assert b.call(cmd="imm_count", imms=[1])["counts"] == {"1": 0}, "not reordered"
            a.reply(timeout=60)
            assert b.call(cmd="wait_imms", imms={"1": 1}, timeout=60)["left"] == {"1": 0}
            # Random transfers sharded over all three links land exactly.
            src = np.random.default_rng(9).integers(0, 256, size, np.uint8)
            image = np.array(b.view())
            rng = random.Random(4)
            for rnd in range(3):
                imm = 10 + rnd
                ops, writes = multinic.random_ops(rng, size, desc, 12, imm)
                r = a.call(cmd="batch", ops=ops, timeout=120)
                assert not [x for x in r["results"] if "error" in x], r
                n = multinic.total_imms(r["results"])
                w = b.call(cmd="wait_imms", imms={str(imm): n}, timeout=120)
                assert w["left"] == {str(imm): 0}
                for s, d, ln in writes:
                    image[d : d + ln] = src[s : s + ln]
                assert np.array_equal(b.view(), image)
            per_link = [s["bytes_written"] for s in a.call(cmd="stats")["stats"]]
            assert all(x > 0 for x in per_link), per_link
        finally:
            a.close()
            b.close()


@pytest.mark.timeout(180)
def test_short_soak_finds_no_corruption() -> None:
    logs: list = []
    out = multinic.soak(4, [800, 400, 200, 100], 30.0, size=16 * MiB, seed=11, log=logs.append)
    assert out["batches"] > 0 and out["ops"] > 0
    assert out["corrupt_batches"] == 0, logs
    assert out["imm_mismatches"] == 0
    assert out["errors"] == 0, logs
    assert all(s["bytes_written"] > 0 for s in out["link_stats"])
