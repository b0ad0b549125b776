#!/usr/bin/env python3
"""KV-cache streaming (stolon.kvcache, issue 6): streaming vs transfer-after-prefill.

Two processes: prefill (process A, ``cuda:0``) and decode (process B, ``cuda:1``), one engine
each, a decoder-only transformer with a paged KV cache (:class:`PagedLM`, random weights from a
fixed seed). Per request the decode side sends a grant, the prefill side runs the prompt and its
writes leave through a watched progress counter:

- **streaming**: the model bumps the counter from its CUDA stream after each layer's K/V pages
  are stored (``PrefillStream.layer_done_on_stream``, ``cuStreamWriteValue64``), so each layer
  moves while the next one computes; the tail (first token) is released when prefill ends;
- **after prefill**: the same writes, all released at once when prefill ends.

Measured per request, on one clock (``CLOCK_MONOTONIC`` is system-wide on Linux): the time from
"prefill ended" (first token on the host) to "decode may start" (the decode side counted every
immediate). Two yardsticks for the streaming overhead, both from the same run: one layer's
transfer through the engine's paged path (that layer's K and V pages written alone, timed to
the receiver's count; the issue's target: streaming overhead <= one layer's transfer), and one
layer's bytes at the link's rate (an in-process peer copy ``cuda:0 -> cuda:1`` of one layer's
K/V bytes, contiguous, and of 256 MiB, timed with CUDA events). The decoded tokens are checked
against a single-process run of the same model.

With one GPU (``--gpus 1``) both processes run on ``cuda:0`` (the engine's CUDA IPC path within
one device): a smoke run, not an NVLink figure.

    python3 benchmarks/bench_kvcache.py --json kv.json            # GPUs: NVLink and staged tcp
    python3 benchmarks/bench_kvcache.py --device cpu --quick      # CPU: tcp on loopback
    python3 benchmarks/bench_kvcache.py --gpus 1 --quick --paths nvlink   # one-GPU smoke run

The module also holds :class:`PagedLM`, used by ``tests/test_kvcache_gpu.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import benchmeta
from procpool import Pool

# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`PagedLM` (GQA attention with learned positions, pre-norm, ReLU MLP)."""

    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    vocab: int = 200
    page_tokens: int = 16
    max_pos: int = 512
    dtype: str = "float32"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def page_elems(self) -> int:
        return self.page_tokens * self.kv_heads * self.head_dim

    def params(self) -> int:
        """Number of weights."""
        kv = self.kv_heads * self.head_dim
        per_layer = self.hidden * (2 * self.hidden + 2 * kv + 2 * self.ffn)
        return self.layers * per_layer + self.vocab * self.hidden * 2 + self.max_pos * self.hidden

    def itemsize(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]


def make_layout(cfg: ModelConfig, num_pages: int, order: str = "layer_major") -> Any:
    """The cache layout of a ``cfg`` model: tensors ``k`` and ``v``, one page holding
    ``page_tokens x kv_heads x head_dim`` elements."""
    from stolon.kvcache import KVCacheLayout

    return KVCacheLayout.build(
        cfg.layers,
        num_pages,
        cfg.page_elems,
        tensors=("k", "v"),
        itemsize=cfg.itemsize(),
        order=order,
        tokens_per_page=cfg.page_tokens,
    )


class PagedLM:
    """A decoder-only transformer whose attention reads K/V from a paged cache.

    The cache is one flat tensor described by a :class:`stolon.kvcache.KVCacheLayout`; a page
    table (list of page indices in token order) maps positions to pages. Weights come from a
    generator seeded with ``seed`` on ``device``, so processes on equal devices compute
    bit-identical results. Nothing in a forward pass reads back to the host except the argmax,
    so the layer hooks (counter writes on the CUDA stream) run ahead of the GPU.
    """

    def __init__(self, cfg: ModelConfig, device: str = "cpu", seed: int = 0) -> None:
        import torch

        self.torch = torch
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # bit-identical across processes
        g = torch.Generator(device=self.device).manual_seed(seed)

        def w(*shape: int, scale: float) -> Any:
            x = torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)
            return (x * scale).to(self.dtype)

        h, kv = cfg.hidden, cfg.kv_heads * cfg.head_dim
        self.embed = w(cfg.vocab, h, scale=1.0)
        self.pos = w(cfg.max_pos, h, scale=0.5)
        self.layers = [
            {
                "q": w(h, h, scale=h**-0.5),
                "kv": w(h, 2 * kv, scale=h**-0.5),
                "o": w(h, h, scale=h**-0.5),
                "up": w(h, cfg.ffn, scale=h**-0.5),
                "down": w(cfg.ffn, h, scale=0.5 * cfg.ffn**-0.5),
            }
            for _ in range(cfg.layers)
        ]
        self.head = w(h, cfg.vocab, scale=h**-0.5)

    # -- cache access --

    def new_cache(self, layout: Any) -> Any:
        """A zeroed flat cache tensor for ``layout`` on this model's device."""
        return self.torch.zeros(layout.total_elems, dtype=self.dtype, device=self.device)

    @staticmethod
    def _pages_view(cache: Any, layout: Any) -> Any:
        """``[layer, tensor, page, page_elems]`` view of a flat cache (any layout strides)."""
        return cache.as_strided(
            (layout.num_layers, len(layout.tensors), layout.num_pages, layout.page_elems),
            (layout.layer_stride, layout.tensor_stride, layout.page_stride, 1),
            layout.offset,
        )

    def _index(self, pages: Any) -> Any:
        if isinstance(pages, self.torch.Tensor):
            return pages
        return self.torch.tensor(list(pages), dtype=self.torch.long, device=self.device)

    # -- forward --

    def _norm(self, x: Any) -> Any:
        return self.torch.nn.functional.layer_norm(x, (self.cfg.hidden,))

    def _block(self, layer: int, x: Any, view: Any, pages: Any, pos0: int) -> Any:
        cfg, p = self.cfg, self.layers[layer]
        n, tpp, kvh, hd = x.shape[0], cfg.page_tokens, cfg.kv_heads, cfg.head_dim
        hx = self._norm(x)
        q = (hx @ p["q"]).view(n, cfg.heads, hd)
        k, v = (hx @ p["kv"]).split(kvh * hd, dim=-1)
        total = pos0 + n
        for t, val in ((0, k), (1, v)):
            kv = view[layer, t]
            if pos0 == 0:  # prefill: whole pages (the tail of the last page zero-padded)
                need = -(-n // tpp)
                padded = self.torch.zeros(need * tpp, kvh * hd, dtype=val.dtype, device=val.device)
                padded[:n] = val
                kv[pages[:need]] = padded.view(need, tpp * kvh * hd)
            else:  # decode: one token into its page
                assert n == 1
                at = (pos0 % tpp) * kvh * hd
                kv[pages[pos0 // tpp], at : at + kvh * hd] = val.reshape(-1)
        keys, vals = [self._gather(view, layer, t, pages, total) for t in (0, 1)]
        rep = cfg.heads // kvh
        keys = keys.repeat_interleave(rep, dim=1).transpose(0, 1).unsqueeze(0)
        vals = vals.repeat_interleave(rep, dim=1).transpose(0, 1).unsqueeze(0)
        qh = q.transpose(0, 1).unsqueeze(0)
        assert n == total or n == 1
        att = self.torch.nn.functional.scaled_dot_product_attention(qh, keys, vals, is_causal=n > 1)
        x = x + att[0].transpose(0, 1).reshape(n, cfg.hidden) @ p["o"]
        return x + self.torch.relu(self._norm(x) @ p["up"]) @ p["down"]

    def _gather(self, view: Any, layer: int, t: int, pages: Any, total: int) -> Any:
        cfg = self.cfg
        need = -(-total // cfg.page_tokens)
        rows = view[layer, t][pages[:need]]
        return rows.reshape(need * cfg.page_tokens, cfg.kv_heads, cfg.head_dim)[:total]

    def forward(
        self,
        ids: Any,
        cache: Any,
        layout: Any,
        pages: Any,
        pos0: int,
        hook: Optional[Callable[[int], None]] = None,
    ) -> Tuple[Any, Any]:
        """Runs ``ids`` (a device LongTensor) at positions ``pos0..``; returns (next-token
        tensor, last hidden state), both on the device, without synchronizing. ``hook(layer)``
        runs once ``layer``'s K/V pages are stored (its pages may stream from then on)."""
        view = self._pages_view(cache, layout)
        pages = self._index(pages)
        x = self.embed[ids] + self.pos[pos0 : pos0 + ids.shape[0]]
        for layer in range(self.cfg.layers):
            x = self._block(layer, x, view, pages, pos0)
            if hook is not None:
                hook(layer)
        last = self._norm(x[-1])
        return self.torch.argmax(last.float() @ self.head.float()), last

    def prefill(
        self,
        prompt: Sequence[int],
        cache: Any,
        layout: Any,
        pages: Any,
        hook: Optional[Callable[[int], None]] = None,
    ) -> Tuple[int, Any]:
        """Fills the cache for ``prompt``; returns the first generated token and last hidden."""
        with self.torch.no_grad():
            ids = self.torch.tensor(list(prompt), dtype=self.torch.long, device=self.device)
            tok, last = self.forward(ids, cache, layout, pages, 0, hook)
            return int(tok.item()), last

    def decode(
        self, first: int, num_prompt: int, cache: Any, layout: Any, pages: Any, steps: int
    ) -> List[int]:
        """Greedy decoding of ``steps`` tokens after ``first`` (which sits at ``num_prompt``)."""
        out, tok = [first], first
        pages = self._index(pages)
        with self.torch.no_grad():
            for i in range(steps - 1):
                ids = self.torch.tensor([tok], dtype=self.torch.long, device=self.device)
                t, _ = self.forward(ids, cache, layout, pages, num_prompt + i)
                tok = int(t.item())
                out.append(tok)
        return out

    def generate(self, prompt: Sequence[int], steps: int) -> List[int]:
        """The single-process reference: prefill and decode in one cache (pages reversed: any
        page table gives the same tokens)."""
        need = -(-(len(prompt) + steps) // self.cfg.page_tokens)
        layout = make_layout(self.cfg, need)
        cache = self.new_cache(layout)
        pages = list(range(need))[::-1]
        first, _ = self.prefill(prompt, cache, layout, pages)
        return self.decode(first, len(prompt), cache, layout, pages, steps)


# ------------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------------


def make_engine(device: str, path: str, max_message_bytes: int = 1 << 20) -> Any:
    """An engine for ``path``: "nvlink" (GPU, NVLink domain), "staged" (GPU memory through
    pinned buffers over tcp) or "tcp" (CPU memory); socket endpoints on 127.0.0.1."""
    import stolon
    from stolon.engine import loopback_nodes

    kw: Dict[str, Any] = dict(nodes=loopback_nodes("tcp", 1), max_message_bytes=max_message_bytes)
    if device.startswith("cuda"):
        kw.update(cuda_device=int(device.split(":")[1]), nvlink=path == "nvlink")
        kw.update(recv_buffers=32, send_buffers=32)
    else:
        kw.update(spin_us=200)  # a small CPU box: do not let idle workers spin for long
    return stolon.TransferEngine("tcp", 1, **kw)


def _sync(state: dict) -> None:
    if state["device"].startswith("cuda"):
        state["torch"].cuda.synchronize(state["device"])


def _cmd_setup(state: dict, role: str, device: str, path: str, cfg: dict, pages: int) -> bytes:
    import torch

    from stolon.kvcache import DecodeReceiver, PrefillWorker

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    mcfg = ModelConfig(**cfg)
    model = PagedLM(mcfg, device, seed=1234)
    layout = make_layout(mcfg, pages)
    cache = model.new_cache(layout)
    eng = make_engine(device, path)
    if role == "decode":
        obj: Any = DecodeReceiver(eng, layout, cache, tail_bytes=1 << 16, timeout=120.0)
        out = eng.address.to_bytes()
    else:
        obj = PrefillWorker(eng, layout, cache, tail_bytes=1 << 16, timeout=120.0)
        out = obj.descriptor.to_bytes()
    state.update(
        torch=torch, device=device, cfg=mcfg, model=model, layout=layout, cache=cache,
        engine=eng, obj=obj, role=role, path=path, grant=None,
    )  # fmt: skip
    return out


def _cmd_teardown(state: dict) -> None:
    eng = state.get("engine")
    state.clear()
    if eng is not None:
        eng.stop()


def _cmd_start(state: dict, prefill_desc: bytes, prompt: List[int], reserve: int) -> int:
    import stolon

    desc = stolon.MemoryDescriptor.from_bytes(prefill_desc)
    return state["obj"].start_request(desc, len(prompt), reserve_tokens=reserve, meta=b"")


def _cmd_ready(state: dict, rid: int, release: bool = True) -> Dict[str, Any]:
    """Decode side: waits until the request landed; returns the time and the tail's token."""
    tail = state["obj"].wait(rid, 120.0)
    t = time.monotonic()
    eng = state["engine"]
    leftover = eng.imm_count(state["obj"]._get(rid).imm)
    if release:
        state["obj"].release(rid)
    return {"t_ready": t, "first": tail.first_token, "leftover_imms": leftover}


def _cmd_serve(state: dict, prompt: List[int], mode: str) -> Dict[str, Any]:
    """Prefill side: takes one grant, runs the prompt streaming ("stream") or releasing every
    write after prefill ("after"); returns the prefill's start and end times."""
    tx = state["obj"]
    torch = state["torch"]
    grant = tx.next_request(120.0)
    src_pages = list(range(len(grant.pages)))
    stream = tx.start(grant, src_pages)
    cuda = state["device"].startswith("cuda")
    hook: Optional[Callable[[int], None]] = None
    if mode == "stream":
        if cuda:
            raw = torch.cuda.current_stream().cuda_stream

            def hook(layer: int) -> None:
                stream.layer_done_on_stream(layer, raw)
        else:
            hook = stream.layer_done
    _sync(state)
    t0 = time.monotonic()
    first, last = state["model"].prefill(prompt, state["cache"], state["layout"], src_pages, hook)
    t1 = time.monotonic()  # prefill ended: the first token is on the host
    stream.finish(first, len(prompt), b"")
    stream.wait(120.0)
    state["grant"], state["src_pages"] = grant, src_pages
    return {"t_start": t0, "t_end": t1, "first": first, "imms": sum(stream.imm_counts)}


def _cmd_layer_imms(state: dict, rid: int) -> int:
    """Decode side: immediates one layer of request ``rid`` brings (K and V pages)."""
    rx = state["obj"]
    req = rx._get(rid)
    eng = state["engine"]
    return (req.expected - eng.imm_count_write(rx.tail_bytes)) // state["layout"].num_layers


def _cmd_expect(state: dict, imm: int, count: int) -> float:
    state["engine"].wait_imm(imm, count, timeout=60.0)
    return time.monotonic()


def _cmd_write_layer(state: dict, layer: int, imm: int) -> Tuple[float, int]:
    """Prefill side: writes one layer's K and V pages of the last grant again, with ``imm``."""
    import stolon

    tx, grant = state["obj"], state["grant"]
    dst = tx.peer_layout(grant)
    desc = stolon.MemoryDescriptor.from_bytes(grant.cache_desc)
    eng = state["engine"]
    ws = tx.layout.layer_writes(layer, state["src_pages"], dst, grant.pages)
    t0 = time.monotonic()
    futs = [
        eng.write_paged(
            tx.region, desc, w.page_bytes, list(w.src_pages), list(w.dst_pages),
            src_stride=w.src_stride, dst_stride=w.dst_stride, src_offset=w.src_offset,
            dst_offset=w.dst_offset, imm=imm,
        )
        for w in ws
    ]  # fmt: skip
    for f in futs:
        f.wait(60.0)
    return t0, sum(f.imm_count for f in futs)


def _cmd_path(state: dict) -> str:
    """Prefill side: the path its writes of the last grant took."""
    import stolon

    desc = stolon.MemoryDescriptor.from_bytes(state["grant"].cache_desc)
    return state["engine"].path(state["obj"].region, desc)


def _cmd_decode_check(
    state: dict, prompt: List[int], steps: int, reserve: int, prefill_desc: bytes
):
    """Decode side: a fresh request is expected to have landed: decode ``steps`` tokens and
    the single-process reference; returns both."""
    rid = _cmd_start(state, prefill_desc, prompt, reserve)
    state["pending_check"] = (rid, prompt, steps)
    return rid


def _cmd_decode_finish(state: dict) -> Tuple[List[int], List[int]]:
    rid, prompt, steps = state.pop("pending_check")
    rx = state["obj"]
    tail = rx.wait(rid, 120.0)
    toks = state["model"].decode(
        tail.first_token, tail.num_tokens, state["cache"], state["layout"], rx.pages(rid), steps
    )
    rx.release(rid)
    return toks, state["model"].generate(prompt, steps)


def Workers(n: int, timeout: float = 300.0) -> Pool:  # noqa: N802 (reads as a class)
    """``n`` spawned processes serving this module's ``_cmd_*`` functions."""
    return Pool(n, "bench_kvcache", timeout)


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------

DEC, PRE = 0, 1


def _request(w: Pool, desc: bytes, prompt: List[int], mode: str) -> Dict[str, float]:
    rid = w.call(DEC, "start", prefill_desc=desc, prompt=prompt, reserve=0)
    w.send(DEC, "ready", rid=rid)
    w.send(PRE, "serve", prompt=prompt, mode=mode)
    pre = w.recv(PRE)
    dec = w.recv(DEC)
    if dec["first"] != pre["first"] or dec["leftover_imms"] != 0:
        raise RuntimeError(f"request {rid}: tail {dec} does not match prefill {pre}")
    return {
        "prefill_s": pre["t_end"] - pre["t_start"],
        "extra_s": dec["t_ready"] - pre["t_end"],
        "imms": pre["imms"],
    }


def run_path(args: argparse.Namespace, cfg: ModelConfig, path: str, devs: Tuple[str, str]):
    """All measurements of one path; returns a result row."""
    import numpy as np

    prompt = np.random.default_rng(7).integers(0, cfg.vocab, args.prompt).tolist()
    prompt_pages = -(-args.prompt // cfg.page_tokens)
    pages = 2 * prompt_pages + 8
    w = Workers(2)
    try:
        cdict = dataclasses.asdict(cfg)
        w.send(DEC, "setup", role="decode", device=devs[1], path=path, cfg=cdict, pages=pages)
        w.send(PRE, "setup", role="prefill", device=devs[0], path=path, cfg=cdict, pages=pages)
        w.recv(DEC)
        desc = w.recv(PRE)
        _request(w, desc, prompt, "stream")  # warm-up (CUDA IPC mapping, allocator, kernels)
        _request(w, desc, prompt, "after")
        took = w.call(PRE, "path")
        stream, after = [], []
        for _ in range(args.repeats):
            stream.append(_request(w, desc, prompt, "stream"))
            after.append(_request(w, desc, prompt, "after"))
        # one layer's transfer: that layer's K and V pages alone, timed to the receiver's count
        rid = w.call(DEC, "start", prefill_desc=desc, prompt=prompt, reserve=0)
        w.send(DEC, "ready", rid=rid, release=False)
        w.send(PRE, "serve", prompt=prompt, mode="after")
        w.recv(PRE)
        w.recv(DEC)
        per_layer = w.call(DEC, "layer_imms", rid=rid)
        layer_s = []
        for k in range(args.repeats + 2):
            imm = 0x51000000 + k
            w.send(DEC, "expect", imm=imm, count=per_layer)
            time.sleep(0.05)  # the receiver is waiting before the first byte moves
            t0, sent = w.call(PRE, "write_layer", layer=k % cfg.layers, imm=imm)
            t1 = w.recv(DEC)
            if sent != per_layer:
                raise RuntimeError(f"layer write carried {sent} immediates, expected {per_layer}")
            layer_s.append(t1 - t0)
        layer_s = layer_s[2:]
        # correctness: decode after a streamed request equals the single-process run
        rid = w.call(
            DEC, "decode_check", prompt=prompt, steps=args.steps, reserve=args.steps,
            prefill_desc=desc,
        )  # fmt: skip
        w.call(PRE, "serve", prompt=prompt, mode="stream")
        toks, ref = w.call(DEC, "decode_finish")
        for i in (DEC, PRE):
            w.call(i, "teardown")
    finally:
        w.close()
    kv_layer = 2 * prompt_pages * cfg.page_elems * cfg.itemsize()
    med = statistics.median
    row = {
        "path": took,
        "devices": list(devs),
        "model_params": cfg.params(),
        "layers": cfg.layers,
        "hidden": cfg.hidden,
        "kv_heads": cfg.kv_heads,
        "dtype": cfg.dtype,
        "prompt_tokens": args.prompt,
        "page_tokens": cfg.page_tokens,
        "page_bytes": cfg.page_elems * cfg.itemsize(),
        "pages_per_request": prompt_pages,
        "kv_bytes_per_layer": kv_layer,
        "kv_bytes_per_request": kv_layer * cfg.layers,
        "imms_per_request": stream[0]["imms"],
        "prefill_s": med([r["prefill_s"] for r in stream + after]),
        "extra_after_prefill_s": med([r["extra_s"] for r in after]),
        "extra_streaming_s": med([r["extra_s"] for r in stream]),
        "extra_streaming_max_s": max(r["extra_s"] for r in stream),
        "one_layer_transfer_s": med(layer_s),
        "layer_gb_per_s": kv_layer / med(layer_s) / 1e9,
        "tokens_equal_single_process": toks == ref,
        "tokens": toks,
        "repeats": args.repeats,
    }
    row["streaming_overhead_le_one_layer"] = row["extra_streaming_s"] <= row["one_layer_transfer_s"]
    return row


def link_rate(devs: Tuple[str, str], nbytes: int) -> Dict[str, float]:
    """In-process copies ``devs[0] -> devs[1]``, timed with CUDA events (median of 10 after a
    warm-up): one layer's K/V bytes as one contiguous copy, and 256 MiB."""
    import torch

    out: Dict[str, float] = {}
    for key, n in (("layer", nbytes), ("bulk", 256 << 20)):
        a = torch.randint(0, 256, (n,), dtype=torch.uint8, device=devs[0])
        b = torch.empty(n, dtype=torch.uint8, device=devs[1])
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.copy_(a)
        torch.cuda.synchronize(devs[0])
        ts = []
        for _ in range(10):
            e0.record()
            b.copy_(a)
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
        out[f"{key}_s"] = statistics.median(ts)
        out[f"{key}_gb_per_s"] = n / out[f"{key}_s"] / 1e9
        del a, b
    torch.cuda.empty_cache()
    return out


GPU_MODEL = ModelConfig(
    layers=32, hidden=4096, heads=32, kv_heads=8, ffn=16384, vocab=32000, page_tokens=64,
    max_pos=4096 + 64, dtype="bfloat16",
)  # fmt: skip
CPU_MODEL = ModelConfig(
    layers=4, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=100, page_tokens=4, max_pos=256,
    dtype="float32",
)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="default: cuda if 2 GPUs"
    )
    ap.add_argument("--paths", default=None, help="nvlink,staged (GPU) or tcp (CPU)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--page-tokens", type=int)
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (GPU 4096, CPU 64)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="decoded tokens checked")
    ap.add_argument("--quick", action="store_true", help="fewer layers and tokens, 2 repeats")
    ap.add_argument("--gpus", type=int, default=None,
                    help="2 GPUs (default with 2+) or 1 (both processes on cuda:0)")  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = args.gpus if args.gpus is not None else min(ngpu, 2)
    device = args.device or ("cuda" if ngpu >= 2 or (args.gpus and ngpu >= 1) else "cpu")
    if device == "cuda" and (gpus < 1 or gpus > ngpu):
        print(f"needs {max(gpus, 1)} GPU(s) for --device cuda, {ngpu} visible", file=sys.stderr)
        return 2
    cfg = GPU_MODEL if device == "cuda" else CPU_MODEL
    if args.prompt is None:
        args.prompt = 4096 if device == "cuda" else 64
    if args.quick:
        cfg = dataclasses.replace(cfg, layers=max(2, cfg.layers // 4))
        args.prompt = max(cfg.page_tokens, args.prompt // 4)
        args.repeats = min(args.repeats, 2)
    over = {
        "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
        "kv_heads": args.kv_heads, "ffn": args.ffn, "page_tokens": args.page_tokens,
        "dtype": args.dtype,
    }  # fmt: skip
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    cfg = dataclasses.replace(cfg, max_pos=max(cfg.max_pos, args.prompt + args.steps + 1))
    paths = (args.paths or ("nvlink,staged" if device == "cuda" else "tcp")).split(",")
    devs = ("cuda:0", f"cuda:{1 if gpus >= 2 else 0}") if device == "cuda" else ("cpu", "cpu")
    t_all = time.monotonic()
    link: Dict[str, float] = {}
    if device == "cuda":
        layer_bytes = 2 * (-(-args.prompt // cfg.page_tokens)) * cfg.page_elems * cfg.itemsize()
        link = link_rate(devs, layer_bytes)
        print(json.dumps({"link": link}), flush=True)
    rows = []
    for path in paths:
        row = run_path(args, cfg, path, devs)
        if link:
            row["link_layer_s"] = link["layer_s"]
            row["link_gb_per_s"] = link["layer_gb_per_s"]
            row["link_bulk_gb_per_s"] = link["bulk_gb_per_s"]
            row["extra_streaming_over_paged_layer"] = (
                row["extra_streaming_s"] / row["one_layer_transfer_s"]
            )
            row["extra_streaming_over_link_layer"] = row["extra_streaming_s"] / link["layer_s"]
            row["paged_fraction_of_link"] = row["layer_gb_per_s"] / link["layer_gb_per_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)

    print(
        f"\n== KV-cache streaming: {cfg.params() / 1e9:.2f}B params, {cfg.layers} layers, "
        f"{cfg.dtype}, prompt {args.prompt} tokens, pages of {cfg.page_tokens} tokens "
        f"({rows[0]['page_bytes']} B), {rows[0]['pages_per_request']} pages/request/tensor, "
        f"KV {rows[0]['kv_bytes_per_layer'] / 2**20:.2f} MiB/layer"
    )
    hdr = (
        f"{'path':<8} {'prefill ms':>10} {'after-prefill ms':>17} {'streaming ms':>13} "
        f"{'1 layer ms':>11} {'layer GB/s':>11} {'stream<=layer':>14} {'tokens ok':>10}"
    )
    print(hdr)
    for r in rows:
        print(
            f"{r['path']:<8} {r['prefill_s'] * 1e3:>10.2f} "
            f"{r['extra_after_prefill_s'] * 1e3:>17.3f} "
            f"{r['extra_streaming_s'] * 1e3:>13.3f} {r['one_layer_transfer_s'] * 1e3:>11.3f} "
            f"{r['layer_gb_per_s']:>11.2f} {str(r['streaming_overhead_le_one_layer']):>14} "
            f"{str(r['tokens_equal_single_process']):>10}"
        )
    print("(times: prefill end -> decode may start; medians)")
    if link:
        print(
            f"link (peer copy {devs[0]} -> {devs[1]}): one layer's bytes in "
            f"{link['layer_s'] * 1e3:.3f} ms ({link['layer_gb_per_s']:.1f} GB/s), 256 MiB at "
            f"{link['bulk_gb_per_s']:.1f} GB/s"
        )
        for r in rows:
            print(
                f"{r['path']:<8} streaming overhead = {r['extra_streaming_over_paged_layer']:.2f}"
                f" x one paged layer, {r['extra_streaming_over_link_layer']:.2f} x one layer at "
                f"the link's rate; paged path at {r['paged_fraction_of_link']:.3f} of the link"
            )
    print(f"total wall time {time.monotonic() - t_all:.1f} s")
    if args.json:
        meta = benchmeta.meta({"model": dataclasses.asdict(cfg), "devices": list(devs)})
        meta.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), gpus=meta["machine"]["gpus"])
        benchmeta.write_json(args.json, {"meta": meta, "rows": rows, "link": link})
    return 0 if all(r["tokens_equal_single_process"] for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
