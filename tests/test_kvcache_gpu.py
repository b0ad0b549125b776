"""KV-cache streaming with CUDA caches (stolon.kvcache, GPU path of issue 6).

Prefill process A (``cuda:0``) streams its paged KV cache into decode process B's paged cache
(``cuda:1``) over the NVLink domain and over staged ``tcp;ofi_rxm``; the model
(``benchmarks/bench_kvcache.py:PagedLM``) bumps the progress counter from its CUDA stream
(``PrefillStream.layer_done_on_stream``). The decode side's expected immediate count follows
the path (staged GPU destinations get one immediate per ``max_message_bytes`` chunk of a page:
the staged cases use 8 KiB pages and 4 KiB messages, so two per page), and the decoded tokens
must equal a single-process run exactly. Also: a GPU-written counter gates every layer, and the
counter writes work when the prefill is captured in a CUDA graph and replayed.

The same scenario runs on the CPU (tcp, and a host cache registered through the staging
protocol) everywhere, so the logic is checked without GPUs; the CUDA cases skip with a reason.
Run on a GPU machine: ``pytest -m gpu tests/test_kvcache_gpu.py``.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
from conftest import require_provider
from procpool import Pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

torch = pytest.importorskip("torch", reason="torch is not installed")

import stolon  # noqa: E402

pytestmark = pytest.mark.gpu

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two = pytest.mark.skipif(NGPU < 2, reason=f"needs two NVIDIA GPUs ({NGPU} visible)")
needs_one = pytest.mark.skipif(NGPU < 1, reason="needs an NVIDIA GPU (none visible)")
TIMEOUT = 60.0
STEPS = 12
#: The test model: 4 layers, K/V pages of 32 tokens x 2 KV heads x 32 dims, float32 = 8 KiB.
MODEL = dict(
    layers=4, hidden=128, heads=4, kv_heads=2, ffn=256, vocab=200, page_tokens=32,
    max_pos=256, dtype="float32",
)  # fmt: skip
PAGE_BYTES = 32 * 2 * 32 * 4
#: Staged cases: messages of half a page, so each page brings two immediates.
SMALL_MESSAGES = 4096  # the smallest the engine takes


def _bench():
    import bench_kvcache

    return bench_kvcache


# ------------------------------------------------------------------------------------------------
# worker commands (run in spawned processes)
# ------------------------------------------------------------------------------------------------


def _engine(device: str, path: str) -> Any:
    msg = SMALL_MESSAGES if path in ("staged", "staged_host") else 1 << 20
    return _bench().make_engine(device, "nvlink" if path == "nvlink" else "tcp", msg)


def _cmd_setup(state: dict, role: str, device: str, path: str, pages: int) -> bytes:
    from stolon.kvcache import DecodeReceiver, PrefillWorker

    b = _bench()
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    cfg = b.ModelConfig(**MODEL)
    model = b.PagedLM(cfg, device, seed=1234)
    layout = b.make_layout(cfg, pages, "page_major" if role == "decode" else "layer_major")
    cache = model.new_cache(layout)
    eng = _engine(device, path)
    if role == "decode":
        obj: Any = DecodeReceiver(
            eng, layout, cache, tail_bytes=1024, timeout=TIMEOUT,
            staged_host=path == "staged_host",
        )  # fmt: skip
        out = eng.address.to_bytes()
    else:
        obj = PrefillWorker(eng, layout, cache, tail_bytes=1024, timeout=TIMEOUT)
        out = obj.descriptor.to_bytes()
    state.update(device=device, model=model, layout=layout, cache=cache, engine=eng, obj=obj)
    return out


def _cmd_teardown(state: dict) -> None:
    eng = state.get("engine")
    state.clear()
    if eng is not None:
        eng.stop()


def _cmd_start(state: dict, prefill_desc: bytes, prompt: List[int], reserve: int) -> dict:
    rx = state["obj"]
    desc = stolon.MemoryDescriptor.from_bytes(prefill_desc)
    rid = rx.start_request(desc, len(prompt), reserve_tokens=reserve)
    req = rx._get(rid)
    return {"rid": rid, "expected": req.expected, "prompt_pages": req.prompt_pages}


def _cmd_serve(state: dict, prompt: List[int], graph_replays: int = 0) -> dict:
    """Prefill: one grant, the model bumps the counter (GPU: on its stream) after each layer."""
    tx = state["obj"]
    grant = tx.next_request(TIMEOUT)
    src_pages = [int(p) for p in np.random.default_rng(5).permutation(tx.layout.num_pages)]
    src_pages = src_pages[: len(grant.pages)]
    stream = tx.start(grant, src_pages)
    cuda = state["device"].startswith("cuda")
    if cuda:
        assert stream.counter.device == torch.cuda.current_device()  # GPU-mapped by default
        raw = torch.cuda.current_stream().cuda_stream

        def hook(layer: int) -> None:
            stream.layer_done_on_stream(layer, raw)
    else:
        hook = stream.layer_done
    model = state["model"]
    first, hidden = model.prefill(prompt, state["cache"], state["layout"], src_pages, hook)
    stream.finish(first, len(prompt), hidden.float().cpu().numpy().tobytes())
    stream.wait(TIMEOUT)
    desc = stolon.MemoryDescriptor.from_bytes(grant.cache_desc)
    return {
        "first": first,
        "imms": sum(stream.imm_counts),
        "steps": len(stream.imm_counts),
        "path": state["engine"].path(tx.region, desc),
    }


def _cmd_decode(state: dict, rid: int, steps: int) -> dict:
    rx = state["obj"]
    tail = rx.wait(rid, TIMEOUT)
    imm = rx._get(rid).imm
    left = state["engine"].imm_count(imm)
    model = state["model"]
    pages = rx.pages(rid)
    toks = model.decode(tail.first_token, tail.num_tokens, state["cache"], state["layout"],
                        pages, steps)  # fmt: skip
    rx.release(rid)
    hidden = np.frombuffer(tail.payload, dtype=np.float32)
    return {
        "tokens": toks,
        "reference": model.generate(_prompt_of(state, tail.num_tokens), steps),
        "leftover": left,
        "hidden_shape": hidden.shape,
        "free": len(rx.free_pages),
    }


def _prompt_of(state: dict, n: int) -> List[int]:
    return state["prompts"][n]


def _cmd_remember(state: dict, prompt: List[int]) -> None:
    state.setdefault("prompts", {})[len(prompt)] = prompt


def _cmd_gating(state: dict) -> dict:
    """One process, two engines on one GPU (staged): the GPU-written counter releases layer
    ``l`` only when the stream gets past its write; nothing leaves before."""
    from stolon.kvcache import DecodeReceiver, KVCacheLayout, PrefillWorker

    torch.cuda.set_device(0)
    lay = KVCacheLayout.build(3, 8, 4096, itemsize=2)  # 8 KiB pages, one token each
    src = torch.randint(0, 256, (lay.total_bytes,), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros_like(src)
    a, b = _engine("cuda:0", "staged"), _engine("cuda:0", "staged")
    try:
        rx = DecodeReceiver(b, lay, dst, tail_bytes=256, timeout=TIMEOUT)
        tx = PrefillWorker(a, lay, src, tail_bytes=256, timeout=TIMEOUT)
        rid = rx.start_request(tx.descriptor, 3)  # 3 tokens of 1 per page
        s = tx.start(tx.next_request(TIMEOUT), [5, 1, 6])
        imm = s.grant.imm
        per_layer = sum(s.imm_counts[:2])
        side = torch.cuda.Stream()
        counts = []
        for layer in range(3):
            with torch.cuda.stream(side):
                torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the write
                s.layer_done_on_stream(layer, side.cuda_stream)
            time.sleep(0.02)
            counts.append(b.imm_count(imm))  # the GPU has not reached the write yet
            side.synchronize()
            deadline = time.monotonic() + TIMEOUT
            while b.imm_count(imm) < per_layer * (layer + 1):
                assert time.monotonic() < deadline
                time.sleep(0.001)
            counts.append(b.imm_count(imm))
        s.finish(7, 3)
        s.wait(TIMEOUT)
        tail = rx.wait(rid, TIMEOUT)
        torch.cuda.synchronize()
        pages = rx.pages(rid)
        same = all(
            torch.equal(
                dst[lay.byte_offset(li, t, d) : lay.byte_offset(li, t, d) + lay.page_bytes],
                src[lay.byte_offset(li, t, p) : lay.byte_offset(li, t, p) + lay.page_bytes],
            )
            for li in range(3)
            for t in range(2)
            for p, d in zip([5, 1, 6], pages)
        )
        return {"counts": counts, "per_layer": per_layer, "first": tail.first_token, "same": same}
    finally:
        a.stop()
        b.stop()


def _cmd_serve_graph(state: dict, prompt: List[int], requests: int) -> List[dict]:
    """Prefill captured once in a CUDA graph (counter writes included) and replayed for
    ``requests`` grants, one counter reused (reset to 0 between requests)."""
    tx = state["obj"]
    model, cache, layout = state["model"], state["cache"], state["layout"]
    n_pages = -(-len(prompt) // layout.tokens_per_page)
    src_pages = list(range(n_pages))
    pages_t = torch.tensor(src_pages, dtype=torch.long, device=state["device"])
    ids = torch.tensor(prompt, dtype=torch.long, device=state["device"])
    counter = stolon.HostCounter(device=torch.cuda.current_device())
    tpl = len(layout.tensors)  # counter value after layer l: (l + 1) * tensors per layer

    def hook(layer: int) -> None:
        counter.write_from_stream((layer + 1) * tpl, torch.cuda.current_stream().cuda_stream)

    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm), torch.no_grad():
        for _ in range(2):
            model.forward(ids, cache, layout, pages_t, 0)  # no hook: the counter stays at 0
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        tok, last = model.forward(ids, cache, layout, pages_t, 0, hook)
    torch.cuda.synchronize()
    out = []
    for _ in range(requests):
        counter.set(0)
        grant = tx.next_request(TIMEOUT)
        assert len(grant.pages) == n_pages
        stream = tx.start(grant, src_pages, counter)
        assert stream.counter_value(layout.num_layers - 1) == layout.num_layers * tpl
        graph.replay()
        first = int(tok.item())
        stream.finish(first, len(prompt), last.float().cpu().numpy().tobytes())
        stream.wait(TIMEOUT)
        sha = _pages_sha(state, src_pages)
        out.append({"first": first, "imms": sum(stream.imm_counts), "sha": sha})
    return out


def _pages_sha(state: dict, pages: List[int]) -> str:
    """Digest of every layer's K and V pages ``pages`` (in order) of this side's cache."""
    lay = state["layout"]
    raw = state["cache"].view(torch.uint8)
    if state["device"].startswith("cuda"):
        torch.cuda.synchronize()
    h = hashlib.sha256()
    for li in range(lay.num_layers):
        for t in range(len(lay.tensors)):
            for p in pages:
                o = lay.byte_offset(li, t, p)
                h.update(raw[o : o + lay.page_bytes].cpu().numpy().tobytes())
    return h.hexdigest()


def _cmd_landed_sha(state: dict, rid: int) -> str:
    rx = state["obj"]
    rx.wait(rid, TIMEOUT)
    sha = _pages_sha(state, rx.pages(rid)[: rx._get(rid).prompt_pages])
    rx.release(rid)
    return sha


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

DEC, PRE = 0, 1

CASES = [
    pytest.param("cpu", "tcp", id="cpu-tcp"),
    pytest.param("cpu", "staged_host", id="cpu-staged-protocol"),
    pytest.param("cuda", "nvlink", id="cuda-nvlink", marks=needs_two),
    pytest.param("cuda", "staged", id="cuda-staged-tcp", marks=needs_two),
]


@pytest.fixture
def pool():
    require_provider("tcp")
    p = Pool(2, __name__, TIMEOUT + 60)
    yield p
    for i in (DEC, PRE):
        try:
            p.call(i, "teardown")
        except AssertionError:
            pass
    p.close()


def _prompt(seed: int, n: int) -> List[int]:
    return np.random.default_rng(seed).integers(0, MODEL["vocab"], n).tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,path", CASES)
def test_streamed_prefill_decodes_like_a_single_process(pool: Pool, kind: str, path: str) -> None:
    devs = ("cuda:0", "cuda:1") if kind == "cuda" else ("cpu", "cpu")
    addr = pool.call(DEC, "setup", role="decode", device=devs[1], path=path, pages=40)
    assert stolon.Address.from_bytes(addr).engine_id
    desc = pool.call(PRE, "setup", role="prefill", device=devs[0], path=path, pages=24)
    for seed, n in ((1, 45), (2, 16)):
        prompt = _prompt(seed, n)
        pool.call(DEC, "remember", prompt=prompt)
        req = pool.call(DEC, "start", prefill_desc=desc, prompt=prompt, reserve=STEPS)
        pre = pool.call(PRE, "serve", prompt=prompt)
        per_page = PAGE_BYTES // SMALL_MESSAGES if path in ("staged", "staged_host") else 1
        want = MODEL["layers"] * 2 * req["prompt_pages"] * per_page + 1  # + the tail
        assert req["expected"] == pre["imms"] == want, (req, pre)
        assert pre["steps"] == MODEL["layers"] * 2 + 1
        assert pre["path"] == {"tcp": "fabric", "staged_host": "staged"}.get(path, path)
        out = pool.call(DEC, "decode", rid=req["rid"], steps=STEPS)
        assert out["leftover"] == 0  # exactly the expected immediates arrived
        assert out["tokens"][0] == pre["first"]
        assert out["tokens"] == out["reference"], (out["tokens"], out["reference"])
        assert len(set(out["tokens"])) > 1  # the model is not degenerate
        assert out["hidden_shape"] == (MODEL["hidden"],) and out["free"] == 40


@needs_one
@pytest.mark.timeout(120)
def test_gpu_written_counter_releases_each_layer_only_when_the_stream_gets_there() -> None:
    p = Pool(1, __name__, TIMEOUT + 60)
    try:
        out = p.call(0, "gating")
    finally:
        p.close()
    n = out["per_layer"]
    assert n == 2 * 3 * 2  # K and V, 3 pages of 8 KiB, two 4 KiB messages per page
    # before each layer's write ran on the GPU only the earlier layers had landed, after it
    # exactly one more layer
    assert out["counts"] == [0, n, n, 2 * n, 2 * n, 3 * n], out
    assert out["same"] and out["first"] == 7


@needs_two
@pytest.mark.timeout(300)
def test_counter_writes_captured_in_a_cuda_graph_release_the_layers(pool: Pool) -> None:
    desc = pool.call(PRE, "setup", role="prefill", device="cuda:0", path="nvlink", pages=24)
    pool.call(DEC, "setup", role="decode", device="cuda:1", path="nvlink", pages=40)
    prompt = _prompt(3, 40)
    rids = [
        pool.call(DEC, "start", prefill_desc=desc, prompt=prompt, reserve=0)["rid"]
        for _ in range(2)
    ]
    outs = pool.call(PRE, "serve_graph", prompt=prompt, requests=2)
    for rid, o in zip(rids, outs):
        assert pool.call(DEC, "landed_sha", rid=rid) == o["sha"]  # byte-exact, every layer
    assert outs[0]["first"] == outs[1]["first"]


def test_module_is_collected_without_gpus() -> None:
    assert Path(__file__).name == "test_kvcache_gpu.py"
