"""KV-cache streaming (stolon.kvcache), CPU path over tcp on loopback.

In-process tests cover layouts, the protocol codec and byte-exact landing of random page tables
and layouts (hypothesis). Multi-process tests (``multiprocessing`` spawn, one engine per
process) run a small torch transformer: prefill in one process streams its paged KV cache layer
by layer into a decode process, whose greedy tokens must equal a single-process run exactly;
several requests from two prefill processes to one decode process; cancellation with page
reuse, including writes that land after the cancel's acknowledgement; and a prefill process
killed mid-stream.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from conftest import require_provider
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procpool import Pool, WorkerError

import stolon
from stolon.engine import loopback_nodes
from stolon.kvcache import (
    Cancel,
    DecodeReceiver,
    Done,
    KVCacheLayout,
    LayoutError,
    Pages,
    PrefillTimeoutError,
    PrefillWorker,
    ProtocolError,
)
from stolon.kvcache import protocol as proto

TIMEOUT = 20.0


def _engine(domains: int = 1) -> stolon.TransferEngine:
    return stolon.TransferEngine("tcp", domains, nodes=loopback_nodes("tcp", domains), spin_us=200)


# ------------------------------------------------------------------------------------------------
# layouts and protocol (no engine)
# ------------------------------------------------------------------------------------------------


def test_layout_offsets_and_paged_writes() -> None:
    lm = KVCacheLayout.build(3, 10, 8, itemsize=2, order="layer_major")
    pm = KVCacheLayout.build(3, 6, 8, itemsize=2, order="page_major")
    assert (lm.layer_stride, lm.tensor_stride, lm.page_stride) == (160, 80, 8)
    assert (pm.layer_stride, pm.tensor_stride, pm.page_stride) == (16, 8, 48)
    assert lm.total_bytes == 3 * 2 * 10 * 8 * 2 and pm.total_bytes == 6 * 3 * 2 * 8 * 2
    assert lm.byte_offset(2, 1, 4) == (2 * 160 + 80 + 4 * 8) * 2
    ws = lm.layer_writes(1, [3, 7], pm, [5, 0])
    assert [(w.tensor, w.src_offset, w.src_stride, w.dst_offset, w.dst_stride) for w in ws] == [
        ("k", 320, 16, 32, 96),
        ("v", 480, 16, 48, 96),
    ]
    assert ws[0].src_pages == (3, 7) and ws[0].dst_pages == (5, 0) and ws[0].page_bytes == 16
    mla = KVCacheLayout.mla(2, 4, 4, 24, order="page_major")
    assert mla.tensors == ("latent",) and mla.page_elems == 96 and mla.page_stride == 192
    with pytest.raises(LayoutError):
        KVCacheLayout.from_strides(2, 4, 8, (8, 8, 8))  # layers and tensors overlap
    with pytest.raises(LayoutError):
        lm.layer_writes(0, [1, 1], pm, [0, 2])  # a page twice
    with pytest.raises(LayoutError):
        lm.layer_writes(0, [1], pm, [6])  # out of range
    with pytest.raises(LayoutError):
        lm.layer_writes(0, [1], mla, [0])  # not compatible
    assert lm.shape_key() == pm.shape_key() != mla.shape_key()


def test_protocol_roundtrip_and_rejects_garbage() -> None:
    msgs = [
        Pages(7, 42, 0x4B560003, 33, 4096, 2048, b"12345678", (10, 160, 80, 8, 0), (3, 9, 1),
              b"desc", b"tail", b"prompt"),
        Done(7, 42, 2048, 33),
        Cancel(9, 42, True, 12, "client went away"),
        Cancel(9, 43),
    ]  # fmt: skip
    for m in msgs:
        data = proto.encode(m)
        assert proto.decode(data) == m
        for cut in range(len(data)):
            with pytest.raises(ProtocolError):
                proto.decode(data[:cut])
        with pytest.raises(ProtocolError):
            proto.decode(data + b"\0")
    bad_version = bytearray(proto.encode(msgs[1]))
    bad_version[2] = 99
    with pytest.raises(ProtocolError, match="version"):
        proto.decode(bytes(bad_version))
    assert len(proto.encode(msgs[1])) == 12 + 16  # compact


# ------------------------------------------------------------------------------------------------
# byte-exact landing, in one process (two engines)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines():
    require_provider("tcp")
    a, b = _engine(2), _engine(1)
    yield a, b
    a.stop()
    b.stop()


@st.composite
def scenarios(draw: Any) -> dict:
    tensors = draw(st.sampled_from([("k", "v"), ("latent",), ("k", "v", "k_scale")]))
    layers = draw(st.integers(1, 5))
    itemsize = draw(st.sampled_from([1, 2, 4]))
    page_elems = draw(st.integers(1, 96))
    n = draw(st.integers(1, 9))
    sides = []
    for _ in range(2):
        pages = draw(st.integers(n, n + 6))
        order = draw(st.sampled_from(["layer_major", "page_major"]))
        pad = draw(st.integers(0, 5))
        sides.append(
            KVCacheLayout.build(layers, pages, page_elems, tensors=tensors, itemsize=itemsize,
                                order=order, page_padding=pad, tokens_per_page=2)
        )  # fmt: skip
    src_pages = draw(st.permutations(range(sides[0].num_pages)))[:n]
    dst_pages = draw(st.permutations(range(sides[1].num_pages)))[:n]
    return {"src": sides[0], "dst": sides[1], "src_pages": src_pages, "dst_pages": dst_pages}


@pytest.mark.timeout(60)
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sc=scenarios(), seed=st.integers(0, 2**16))
def test_random_layouts_and_page_tables_land_byte_exact(engines, sc: dict, seed: int) -> None:
    a, b = engines
    src_l, dst_l = sc["src"], sc["dst"]
    n = len(sc["src_pages"])
    src = np.random.default_rng(seed).integers(0, 256, src_l.total_bytes, dtype=np.uint8)
    dst = np.zeros(dst_l.total_bytes, dtype=np.uint8)
    rx = DecodeReceiver(b, dst_l, dst, tail_bytes=256, max_requests=2, timeout=TIMEOUT)
    tx = PrefillWorker(a, src_l, src, tail_bytes=256, max_requests=2, timeout=TIMEOUT)
    rid = rx.start_request(a.address, n * 2 - 1, pages=sc["dst_pages"], meta=b"m")
    grant = tx.next_request(TIMEOUT)
    assert (grant.request_id, grant.pages, grant.meta) == (rid, tuple(sc["dst_pages"]), b"m")
    s = tx.start(grant, sc["src_pages"])
    for layer in range(src_l.num_layers):
        s.layer_done(layer)
    s.finish(first_token=-5, num_tokens=n * 2 - 1, payload=b"hidden")
    s.wait(TIMEOUT)
    tail = rx.wait(rid, TIMEOUT)
    assert (tail.request_id, tail.first_token, tail.num_tokens, tail.payload) == (
        rid, -5, n * 2 - 1, b"hidden"
    )  # fmt: skip
    want = np.zeros_like(dst)
    for lay in range(src_l.num_layers):
        for t in range(len(src_l.tensors)):
            for sp, dp in zip(sc["src_pages"], sc["dst_pages"]):
                so, do = src_l.byte_offset(lay, t, sp), dst_l.byte_offset(lay, t, dp)
                want[do : do + dst_l.page_bytes] = src[so : so + src_l.page_bytes]
    assert np.array_equal(dst, want)
    assert sum(s.imm_counts) == rx.expected_imm(n)
    assert b.imm_count(grant.imm) == 0  # exactly the expected count arrived, and was consumed
    rx.release(rid)
    assert rx.free_pages == list(range(dst_l.num_pages))


def _poll(pred: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


@pytest.mark.timeout(30)
def test_layers_leave_only_when_the_model_says_so(engines) -> None:
    a, b = engines
    lay = KVCacheLayout.build(3, 4, 64, itemsize=4)
    src = np.random.default_rng(0).integers(0, 256, lay.total_bytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    rx = DecodeReceiver(b, lay, dst, tail_bytes=64, timeout=TIMEOUT)
    tx = PrefillWorker(a, lay, src, tail_bytes=64, timeout=TIMEOUT)
    rid = rx.start_request(a.address, 1)  # one token, one page
    s = tx.start(tx.next_request(TIMEOUT), [2])
    imm, dst_page = s.grant.imm, rx.pages(rid)[0]
    per_layer = b.imm_count_paged(1, lay.page_bytes) * 2
    assert s.imm_counts == [per_layer // 2] * 6 + [1] and rx.expected_imm(1) == 3 * per_layer + 1
    for layer in range(3):
        time.sleep(0.05)
        assert b.imm_count(imm) == per_layer * layer  # nothing before the model's bump
        s.layer_done(layer)
        _poll(lambda: b.imm_count(imm) == per_layer * (layer + 1))  # noqa: B023
        for t in range(2):
            o, p = lay.byte_offset(layer, t, dst_page), lay.byte_offset(layer, t, 2)
            assert np.array_equal(dst[o : o + lay.page_bytes], src[p : p + lay.page_bytes])
    with pytest.raises(PrefillTimeoutError, match="6 of 7 immediates arrived"):
        rx.wait(rid, 0.2)  # the tail has not been released
    s.finish(first_token=3, num_tokens=1)
    s.wait(TIMEOUT)
    assert rx.wait(rid, TIMEOUT).first_token == 3
    rx.release(rid)


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------


def _model():
    import kv_model

    return kv_model, kv_model.TinyLM(seed=1234)


def _cmd_setup(state: dict, role: str, num_pages: int, order: str = "layer_major") -> str:
    km, model = _model()
    eng = _engine(1)
    layout = km.make_layout(num_pages, order)
    cache = km.PagedCache(layout)
    if role == "decode":
        obj: Any = DecodeReceiver(eng, layout, cache.buffer, tail_bytes=1024, timeout=TIMEOUT)
    else:
        obj = PrefillWorker(eng, layout, cache.buffer, tail_bytes=1024, timeout=TIMEOUT)
    state.update(engine=eng, km=km, model=model, cache=cache, obj=obj, streams={})
    return eng.address.to_text()


def _cmd_teardown(state: dict) -> None:
    eng = state.get("engine")
    state.clear()
    if eng is not None:
        eng.stop()


def _cmd_start(state: dict, prefill: str, prompt: List[int], reserve: int) -> int:
    meta = np.asarray(prompt, dtype=np.int32).tobytes()
    addr = stolon.Address.from_text(prefill)
    return state["obj"].start_request(addr, len(prompt), reserve_tokens=reserve, meta=meta)


def _cmd_serve(state: dict, count: int, stop_after_layers: Optional[int] = None) -> List[int]:
    """Takes ``count`` grants, arms all their streams, then runs each prefill; returns ids."""
    tx: PrefillWorker = state["obj"]
    rng = np.random.default_rng(count)
    free = list(rng.permutation(tx.layout.num_pages))
    jobs = []
    for _ in range(count):
        grant = tx.next_request(TIMEOUT)
        prompt = np.frombuffer(grant.meta, dtype=np.int32).tolist()
        src_pages = [int(free.pop()) for _ in grant.pages]
        jobs.append((tx.start(grant, src_pages), prompt, src_pages))  # in flight together
    for stream, prompt, src_pages in jobs:
        if stop_after_layers is not None:
            hook = (lambda s: lambda lay: s.layer_done(lay) if lay < stop_after_layers else None)(
                stream
            )
            state["model"].prefill(prompt, state["cache"], src_pages, hook)
            state["streams"][stream.request_id] = stream
            for f in stream.futures[: stop_after_layers * len(tx.layout.tensors)]:
                f.wait(TIMEOUT)  # the released layers are out; the rest never will be
            continue
        first, hidden = state["model"].prefill(prompt, state["cache"], src_pages, stream.layer_done)
        stream.finish(first, len(prompt), hidden.numpy().tobytes())
    if stop_after_layers is None:
        for stream, _, _ in jobs:
            stream.wait(TIMEOUT)
    return [j[0].request_id for j in jobs]


def _cmd_stream_wait(state: dict, rid: int) -> str:
    try:
        state["streams"][rid].wait(TIMEOUT)
    except Exception as e:
        return type(e).__name__
    return "finished"


def _cmd_rogue(state: dict, ack_count: int, delay: float) -> int:
    """A misbehaving prefill: acks a cancel of its request *before* writing ``ack_count`` pages
    of 0xEE into it, ``delay`` seconds later (writes that land after the acknowledgement)."""
    tx: PrefillWorker = state["obj"]
    eng = state["engine"]
    grant = tx.next_request(TIMEOUT)
    desc = stolon.MemoryDescriptor.from_bytes(grant.cache_desc)
    ack = proto.Cancel(tx.engine_id, grant.request_id, True, ack_count, "rogue")
    eng.send(desc.address, proto.encode(ack)).wait(TIMEOUT)
    time.sleep(delay)
    junk = np.full(tx.layout.page_bytes * len(grant.pages), 0xEE, dtype=np.uint8)
    region = eng.register(junk)
    dst = tx.peer_layout(grant)
    assert eng.imm_count_paged(len(grant.pages), tx.layout.page_bytes) == ack_count
    fut = eng.write_paged(
        region,
        desc,
        tx.layout.page_bytes,
        list(range(len(grant.pages))),
        list(grant.pages),
        dst_offset=dst.byte_offset(0, 0, 0),
        dst_stride=dst.page_stride * dst.itemsize,
        imm=grant.imm,
    )
    fut.wait(TIMEOUT)
    return grant.request_id


def _cmd_decode(state: dict, rid: int, steps: int, timeout: float = TIMEOUT) -> List[int]:
    rx: DecodeReceiver = state["obj"]
    tail = rx.wait(rid, timeout)
    pages = rx.pages(rid)
    hidden = np.frombuffer(tail.payload, dtype=np.float32)
    assert hidden.shape == (64,) and tail.request_id == rid
    tokens = state["model"].decode(tail.first_token, tail.num_tokens, state["cache"], pages, steps)
    rx.release(rid)
    return tokens


def _cmd_wait_error(state: dict, rid: int, timeout: float) -> tuple:
    t0 = time.monotonic()
    try:
        state["obj"].wait(rid, timeout)
    except Exception as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def _cmd_cancel(state: dict, rid: int) -> None:
    state["obj"].cancel(rid, "test")


def _cmd_pages(state: dict, rid: int) -> List[int]:
    return state["obj"].pages(rid)


def _cmd_accounting(state: dict) -> Dict[str, Any]:
    rx: DecodeReceiver = state["obj"]
    return {"free": rx.free_pages, "quarantined": rx.quarantined_pages, "errors": rx.errors}


def _cmd_page_bytes(state: dict, pages: List[int]) -> bytes:
    cache = state["cache"]
    return b"".join(cache.page(0, 0, p).numpy().tobytes() for p in pages)


DECODE, P1, P2 = 0, 1, 2


@pytest.fixture(scope="module")
def pool():
    require_provider("tcp")
    p = Pool(3, __name__, TIMEOUT + 30)
    yield p
    p.close()


@pytest.fixture(scope="module")
def ref():
    import kv_model

    model = kv_model.TinyLM(seed=1234)
    return lambda prompt, steps: model.generate(prompt, steps)


def _prompt(seed: int, n: int) -> List[int]:
    return np.random.default_rng(seed).integers(0, 100, n).tolist()


def _roles(pool: Pool, decode_pages: int, order: str = "page_major") -> List[str]:
    addrs = [pool.call(DECODE, "setup", role="decode", num_pages=decode_pages, order=order)]
    for i in (P1, P2):
        addrs.append(pool.call(i, "setup", role="prefill", num_pages=48, order="layer_major"))
    return addrs


def _teardown(pool: Pool) -> None:
    for i in (DECODE, P1, P2):
        pool.call(i, "teardown")


def _wait_for(pool: Pool, pred: Any, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        acc = pool.call(DECODE, "accounting")
        if pred(acc):
            return acc
        assert time.monotonic() < deadline, f"condition not reached: {acc}"
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_prefill_in_one_process_decode_in_another_equals_single_process(pool, ref) -> None:
    addrs = _roles(pool, decode_pages=32)
    try:
        prompt = _prompt(1, 13)
        rid = pool.call(DECODE, "start", prefill=addrs[P1], prompt=prompt, reserve=12)
        assert pool.call(P1, "serve", count=1) == [rid]
        tokens = pool.call(DECODE, "decode", rid=rid, steps=12)
        assert tokens == ref(prompt, 12)
        assert len(set(tokens)) > 1  # the model is not degenerate
    finally:
        _teardown(pool)


@pytest.mark.timeout(90)
def test_several_requests_from_two_prefill_processes_in_flight_at_once(pool, ref) -> None:
    addrs = _roles(pool, decode_pages=64, order="layer_major")
    try:
        prompts = {k: _prompt(10 + k, 5 + 3 * k) for k in range(4)}
        rids = {}
        for k, prompt in prompts.items():
            target = P1 if k % 2 == 0 else P2
            rids[k] = pool.call(DECODE, "start", prefill=addrs[target], prompt=prompt, reserve=8)
        pool.send(P1, "serve", count=2)  # both prefill processes stream at the same time,
        pool.send(P2, "serve", count=2)  # each with two requests armed together
        assert sorted(pool.recv(P1) + pool.recv(P2)) == sorted(rids.values())
        for k in (3, 0, 2, 1):
            assert pool.call(DECODE, "decode", rid=rids[k], steps=8) == ref(prompts[k], 8), k
        assert _wait_for(pool, lambda a: len(a["free"]) == 64)["errors"] == []
    finally:
        _teardown(pool)


@pytest.mark.timeout(90)
def test_cancel_mid_stream_then_reuse_the_pages(pool, ref) -> None:
    addrs = _roles(pool, decode_pages=6)
    try:
        rid1 = pool.call(DECODE, "start", prefill=addrs[P1], prompt=_prompt(2, 16), reserve=0)
        pages1 = pool.call(DECODE, "pages", rid=rid1)
        assert len(pages1) == 4
        pool.call(P1, "serve", count=1, stop_after_layers=2)  # layers 0 and 1 went out
        pool.call(DECODE, "cancel", rid=rid1)
        acc = pool.call(DECODE, "accounting")
        assert set(pages1) <= set(acc["quarantined"]) | set(acc["free"])
        # The prefill side stops, waits for its writes, acks; then the pages come back.
        acc = _wait_for(pool, lambda a: sorted(a["free"]) == list(range(6)))
        assert acc["quarantined"] == [] and acc["errors"] == []
        assert pool.call(P1, "stream_wait", rid=rid1) == "RequestCancelledError"
        prompt = _prompt(3, 17)
        rid2 = pool.call(DECODE, "start", prefill=addrs[P2], prompt=prompt, reserve=7)
        assert set(pool.call(DECODE, "pages", rid=rid2)) >= set(pages1)  # reused
        pool.call(P2, "serve", count=1)
        assert pool.call(DECODE, "decode", rid=rid2, steps=8) == ref(prompt, 8)
    finally:
        _teardown(pool)


@pytest.mark.timeout(90)
def test_writes_landing_after_the_cancel_ack_never_reach_a_reused_page(pool, ref) -> None:
    addrs = _roles(pool, decode_pages=6)
    try:
        rid1 = pool.call(DECODE, "start", prefill=addrs[P1], prompt=_prompt(4, 8), reserve=0)
        pages1 = pool.call(DECODE, "pages", rid=rid1)
        pool.send(P1, "rogue", ack_count=len(pages1), delay=1.0)
        # The ack arrived, but its writes have not: the pages stay quarantined.
        acc = _wait_for(pool, lambda a: a["quarantined"] == sorted(pages1))
        assert not set(pages1) & set(acc["free"])
        with pytest.raises(WorkerError, match="KVStreamError: 6 pages needed"):
            pool.call(DECODE, "start", prefill=addrs[P2], prompt=_prompt(5, 21), reserve=3)
        assert pool.recv(P1) == rid1  # the late writes were sent
        acc = _wait_for(pool, lambda a: sorted(a["free"]) == list(range(6)))
        # They landed while the pages were quarantined:
        junk = pool.call(DECODE, "page_bytes", pages=pages1)
        assert junk == b"\xee" * len(junk)
        prompt = _prompt(5, 21)
        rid2 = pool.call(DECODE, "start", prefill=addrs[P2], prompt=prompt, reserve=3)
        assert set(pool.call(DECODE, "pages", rid=rid2)) >= set(pages1)
        pool.call(P2, "serve", count=1)
        assert pool.call(DECODE, "decode", rid=rid2, steps=4) == ref(prompt, 4)
    finally:
        _teardown(pool)


@pytest.mark.timeout(60)
def test_prefill_killed_mid_stream_makes_the_decode_wait_time_out(pool) -> None:
    victim = Pool(1, __name__, TIMEOUT + 30)
    try:
        dec = pool.call(DECODE, "setup", role="decode", num_pages=16)
        del dec
        addr = victim.call(0, "setup", role="prefill", num_pages=16)
        rid = pool.call(DECODE, "start", prefill=addr, prompt=_prompt(6, 10), reserve=0)
        victim.call(0, "serve", count=1, stop_after_layers=2)
        victim.procs[0].kill()
        victim.procs[0].join(10)
        name, msg, took = pool.call(DECODE, "wait_error", rid=rid, timeout=1.5)
        assert name == "PrefillTimeoutError", msg
        assert "12 of 25 immediates arrived" in msg and 1.4 < took < 5.0
        pool.call(DECODE, "cancel", rid=rid)  # the dead side never acks: pages stay out
        acc = pool.call(DECODE, "accounting")
        assert len(acc["quarantined"]) == 3 and len(acc["free"]) == 13
    finally:
        pool.call(DECODE, "teardown")
        victim.close()
