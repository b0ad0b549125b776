#!/usr/bin/env python3
"""Weight transfer between GPU processes (stolon.weights, issue 7), with baselines from the run.

``--train T --infer I`` processes (default 2 + 2 when 4 GPUs are visible, else 1 + 1), one GPU
each: training rank ``r`` on ``cuda:r``, inference rank ``d`` on ``cuda:T+d``. A dense
transformer-shaped bf16 model (``--gb`` GB of parameters: per layer q, o (h x h), up (f x h),
down (h x f), plus the embedding), FSDP flat shards per layer on the training side,
tensor-parallel row shards on the inference side (``--layout tp``: o and down split by
columns, as serving engines do). Measured, per update, until every inference rank counted
every immediate of the version:

- stolon over the NVLink domain (zero-copy writes from the registered training shards);
- stolon over staged ``tcp;ofi_rxm`` (GPU memory through pinned buffers; ``--staged-gb``,
  smaller, since that path runs at a few GB/s);
- the baseline, torch.distributed (NCCL; gloo on CPU) in the same processes: per FSDP group a
  ``gather`` of the flat shards onto training rank 0, then per tensor a ``broadcast`` to the
  inference ranks, which copy their slice into place (every inference GPU receives whole
  tensors, all from one sender);
- a second baseline that moves only what each inference rank needs, from every training rank:
  the plan's ranges as NCCL grouped send/recv (``batch_isend_irecv``, eager): contiguous
  ranges straight from the shard into the receiver's slot, strided ones (column shards) packed
  into one buffer per (training, inference) pair and unpacked on arrival (bf16 only);
- ceilings: an in-process 1 GiB ``cudaMemcpyPeer`` (``cuda:0 -> cuda:1``, torch ``copy_``).

Reported: seconds per update, GB/s per inference GPU (bytes it receives in its layout / time),
fraction of the peer-copy ceiling, speedup over the baseline. The cost model
(``stolon.weights.CostModel``) is calibrated from stage rates measured in the same run (one
writer's large write over each path, small-write rate and latency, pinned host-to-device copy,
fp8 conversion throughput) and its prediction for each measured update is printed next to it.
The last version pushed is verified on every inference rank (bf16 bit-exact; fp8 bit-exact
against the whole tensor converted in one place).

    python3 benchmarks/bench_weights_gpu.py --json w.json             # 4 GPUs: 2 + 2, 8 GB
    python3 benchmarks/bench_weights_gpu.py --device cpu --quick      # CPU: gloo, tcp, small
    python3 benchmarks/bench_weights_gpu.py --gpus 1 --quick --paths nvlink   # one-GPU smoke

With ``--gpus 1`` every process runs on ``cuda:0`` (the engine's CUDA IPC path within one
device): a smoke run; NCCL refuses two ranks on one GPU, so both baselines are skipped there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import benchmeta
from procpool import Pool

GB = 1e9
TIMEOUT = 120.0

# ------------------------------------------------------------------------------------------------
# model and layouts
# ------------------------------------------------------------------------------------------------


def model_layouts(cfg: dict) -> Tuple[Any, Any]:
    """(training layout, inference layout) of the benchmark model described by ``cfg``."""
    from stolon.weights import (
        FP8,
        FlatGroup,
        FlatShard,
        InferenceLayout,
        ParamSpec,
        TrainingLayout,
        col_shard,
        row_shard,
    )

    h, f, vocab, layers = cfg["hidden"], cfg["ffn"], cfg["vocab"], cfg["layers"]
    T, I = cfg["train"], cfg["infer"]  # noqa: E741
    params: List[Any] = [ParamSpec("embed", (vocab, h))]
    groups = {"embed": FlatGroup("embed", ("embed",), tuple(range(T)))}
    tp: Dict[str, Any] = {"embed": (row_shard(range(I)),)}
    for i in range(layers):
        names = [f"l{i}.q", f"l{i}.o", f"l{i}.up", f"l{i}.down"]
        shapes = [(h, h), (h, h), (f, h), (h, f)]
        params += [ParamSpec(n, s) for n, s in zip(names, shapes)]
        groups[f"l{i}"] = FlatGroup(f"l{i}", tuple(names), tuple(range(T)))
        for n in names:
            by_col = cfg.get("layout") == "tp" and (n.endswith(".o") or n.endswith(".down"))
            tp[n] = (col_shard(range(I)) if by_col else row_shard(range(I)),)
    placements = {p.name: (FlatShard(p.name.split(".")[0]),) for p in params}
    train = TrainingLayout(tuple(params), T, placements, groups)
    dtypes = {p.name: FP8 for p in params if p.name != "embed"} if cfg.get("fp8") else {}
    infer = InferenceLayout(tuple(params), I, tp, dtypes, block=tuple(cfg.get("block", (128, 128))))
    return train, infer


def model_config(gb: float, hidden: int, ffn: int, vocab: int) -> Tuple[int, float]:
    """Layers for about ``gb`` GB of bf16 parameters, and the exact size in GB."""
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * ffn)
    layers = max(1, round((gb * GB - 2 * vocab * hidden) / per_layer))
    return layers, (layers * per_layer + 2 * vocab * hidden) / GB


# ------------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------------


def make_engine(device: str, path: str) -> Any:
    """An engine for ``path``: "nvlink" / "staged" (GPU) or "tcp" (CPU); 127.0.0.1 sockets."""
    import stolon
    from stolon.engine import loopback_nodes

    kw: Dict[str, Any] = dict(nodes=loopback_nodes("tcp", 1), max_message_bytes=1 << 20)
    if device.startswith("cuda"):
        kw.update(cuda_device=int(device.split(":")[1]), nvlink=path == "nvlink")
        kw.update(recv_buffers=32, send_buffers=32)
    else:
        kw.update(spin_us=200)
    return stolon.TransferEngine("tcp", 1, **kw)


def _sync(state: dict) -> None:
    if state["device"].startswith("cuda"):
        state["torch"].cuda.synchronize(state["device"])


def _cmd_setup(state: dict, role: str, rank: int, cfg: dict) -> dict:
    """Builds the plan, the engine, and the sender (training) or receiver (inference)."""
    import torch

    from stolon.weights import WeightReceiver, WeightSender, build_plan
    from stolon.weights.gpu import full_tensors, shard_buffers_torch

    device = cfg["devices"][rank if role == "train" else cfg["train"] + rank]
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    train, infer = model_layouts(cfg)
    plan = build_plan(train, infer)
    eng = make_engine(device, cfg["path"])
    state.update(torch=torch, device=device, cfg=cfg, plan=plan, train=train, infer=infer,
                 engine=eng, role=role, rank=rank)  # fmt: skip
    if role == "train":
        full = full_tensors(train.params, cfg["seed"], 0, device, scale_exp=cfg.get("fp8", False))
        bufs = shard_buffers_torch(train, rank, full)
        del full
        if cfg.get("offload"):  # CPU-offloaded shards: pinned host memory, H2D in the pipeline
            bufs = {k: v.cpu().pin_memory() if device != "cpu" else v for k, v in bufs.items()}
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        state["buffers"] = bufs
        obj: Any = WeightSender(
            eng, plan, rank, bufs, device=device, timeout=TIMEOUT,
            staging_bytes=cfg.get("staging_bytes", 64 << 20), depth=cfg.get("depth", 3),
        )  # fmt: skip
    else:
        obj = WeightReceiver(eng, plan, rank, device=device, timeout=TIMEOUT)
    state["obj"] = obj
    return {"info": obj.info(), "fingerprint": plan.fingerprint()}


def _cmd_connect(state: dict, infos: List[bytes]) -> dict:
    return state["obj"].connect(infos)


def _cmd_accept(state: dict, hellos: List[bytes]) -> None:
    state["obj"].accept(hellos)


def _cmd_push(state: dict, version: int) -> dict:
    t0 = time.monotonic()
    st = state["obj"].push(version)
    st["t0"] = t0
    return st


def _cmd_wait(state: dict, version: int) -> Tuple[float, Dict[str, float]]:
    state["obj"].wait(version, TIMEOUT)
    return time.monotonic(), state["obj"].last_wait


def _cmd_release(state: dict, version: int) -> None:
    state["obj"].release(version)


def _cmd_verify(state: dict, version: int) -> dict:
    """Inference rank: every shard of ``version`` against the reference (bit-exact)."""
    torch = state["torch"]
    from stolon.weights.gpu import full_tensors, quantize_blockwise_torch

    cfg, infer, rank = state["cfg"], state["infer"], state["rank"]
    snap = state["obj"].wait(version, TIMEOUT)
    full = full_tensors(state["train"].params, cfg["seed"], 0, state["device"], cfg.get("fp8"))
    checked, bad = 0, []
    for name, got in snap.tensors.items():
        box = infer.shard_box(name, rank)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(*box))
        if infer.is_fp8(name):
            q, sc = quantize_blockwise_torch(full[name], infer.block)
            want = q[sl]
            lo, hi = infer.scale_box(name, rank)
            want_sc = sc[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1])]
            if not torch.equal(snap.scales[name], want_sc):
                bad.append(name + " (scales)")
            ok = torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
        else:
            ok = torch.equal(got, full[name][sl])
        if not ok:
            bad.append(name)
        checked += got.numel() * got.element_size()
    return {"bytes": checked, "bad": bad}


def _probe_region(state: dict, size: int) -> Any:
    torch = state["torch"]
    if state.get("probe") is None or state["probe"].numel() < size:
        state["probe"] = torch.ones(max(size, 4096), dtype=torch.uint8, device=state["device"])
        state["probe_region"] = state["engine"].register(state["probe"])
    return state["probe_region"]


def _cmd_probe_count(state: dict, size: int) -> int:
    """Training rank: immediates one probe write of ``size`` bytes brings (its path's count)."""
    desc, slot_bytes = state["obj"]._dst[0]
    assert size <= slot_bytes
    return state["engine"].imm_count_for(_probe_region(state, size), desc, size)


def _cmd_path(state: dict) -> str:
    """Training rank: the path its writes into inference rank 0's slots take."""
    desc, _ = state["obj"]._dst[0]
    return state["engine"].path(_probe_region(state, 4096), desc)


def _cmd_probe_send(
    state: dict, size: int, n: int, imm: int, scatter: bool = False
) -> Tuple[float, int]:
    """Training rank: ``n`` writes of ``size`` bytes into inference rank 0's second slot; with
    ``scatter``, as one scatter of ``n`` items (how the executor submits its ranges)."""
    desc, slot_bytes = state["obj"]._dst[0]
    eng, region = state["engine"], _probe_region(state, size)
    t0 = time.monotonic()
    if scatter:
        futs = [eng.scatter(region, [(desc, 0, slot_bytes, size)] * n, imm, timeout=TIMEOUT)]
    else:
        futs = [eng.write(region, 0, desc, slot_bytes, size, imm) for _ in range(n)]
    for f in futs:
        f.wait(TIMEOUT)
    return t0, sum(f.imm_count for f in futs)


def _cmd_probe_wait(state: dict, imm: int, count: int) -> float:
    state["engine"].wait_imm(imm, count, timeout=TIMEOUT)
    return time.monotonic()


def _cmd_dist_init(state: dict, port: int, world: int, rank: int) -> None:
    import torch.distributed as dist

    backend = "nccl" if state["device"].startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=world,
                            rank=rank, device_id=None)  # fmt: skip
    T = state["cfg"]["train"]
    state["dist_train"] = dist.new_group(list(range(T)))
    state["dist_bcast"] = dist.new_group([0] + list(range(T, world)))
    state["dist_rank"] = rank


def _cmd_baseline(state: dict) -> float:
    """One update through torch.distributed: gather the flat shards of each FSDP group onto
    training rank 0, broadcast each tensor to the inference ranks, which copy their slice in.
    Returns this rank's end time."""
    import torch.distributed as dist

    torch = state["torch"]
    train, infer, cfg = state["train"], state["infer"], state["cfg"]
    T, r = cfg["train"], state["dist_rank"]
    dev = state["device"]
    is_train = r < T
    biggest = max(p.numel for p in train.params)
    if "bcast_buf" not in state:
        state["bcast_buf"] = torch.empty(biggest * 2, dtype=torch.uint8, device=dev)
        gs = max(train.shard_numel(g) for g in train.groups) * 2
        state["gather_bufs"] = [torch.empty(gs, dtype=torch.uint8, device=dev) for _ in range(T)]
    snap_mem = None if is_train else state["obj"]
    for gname in train.groups:
        full_flat = None
        if is_train:
            mine = state["buffers"][f"group:{gname}"].reshape(-1).view(torch.uint8)
            n = mine.numel()
            bufs = [b[:n] for b in state["gather_bufs"]] if r == 0 else None
            if mine.device.type != torch.device(dev).type:
                mine = mine.to(dev)
            dist.gather(mine, bufs, dst=0, group=state["dist_train"])
            if r == 0:
                full_flat = torch.cat(bufs)
        for pname, off in train.group_offsets[gname].items():
            p = train.params[train.index[pname]]
            nbytes = p.numel * 2
            if r == 0:
                src = full_flat[2 * off : 2 * off + nbytes]
                dist.broadcast(src, src=0, group=state["dist_bcast"])
            elif not is_train:
                buf = state["bcast_buf"][:nbytes]
                dist.broadcast(buf, src=0, group=state["dist_bcast"])
                t = buf.view(torch.bfloat16).view(p.shape)
                d = r - T
                box = infer.shard_box(pname, d)
                sl = tuple(slice(int(a), int(b)) for a, b in zip(*box))
                e = snap_mem.layout.entry(infer.index[pname])
                slot = snap_mem.slot(0)[e.offset : e.offset + e.nbytes]
                if not infer.is_fp8(pname):
                    slot.view(torch.bfloat16).view(e.shape).copy_(t[sl])
    _sync(state)
    return time.monotonic()


def _shard_ops(state: dict) -> dict:
    """This rank's side of the shards-only baseline, built once from the plan: the tensors to
    send or receive directly (contiguous ranges) and, per peer, the strided ranges packed into
    one buffer."""
    torch = state["torch"]
    plan, train, cfg = state["plan"], state["train"], state["cfg"]
    T, r = cfg["train"], state["dist_rank"]
    data = plan.data
    direct: List[Tuple[str, Any, int]] = []  # (isend / irecv, tensor, peer)
    packed: Dict[int, List[Any]] = {}  # peer -> strided views, in table order
    if r < T:
        rows = data.for_src(r)
        for i in range(len(rows)):
            peer = T + int(rows.dst_rank[i])
            buf = state["buffers"][train.buffer_names[int(rows.src_buf[i])]].reshape(-1)
            off, ln, cnt = int(rows.src_off[i]), int(rows.length[i]), int(rows.count[i])
            if cnt == 1:
                direct.append(("send", buf[off : off + ln], peer))
            else:
                v = buf.as_strided(
                    (cnt, ln), (int(rows.src_stride[i]), 1), buf.storage_offset() + off
                )
                packed.setdefault(peer, []).append(v)
    else:
        d = r - T
        rows = data.for_dst(d)
        lay = state["obj"].layout
        slot = state["obj"].slot(0)
        for i in range(len(rows)):
            peer = int(rows.src_rank[i])
            e = lay.entry(int(rows.param[i]))
            flat = slot[e.offset : e.offset + e.nbytes].view(torch.bfloat16)
            off, ln, cnt = int(rows.dst_off[i]), int(rows.length[i]), int(rows.count[i])
            if cnt == 1:
                direct.append(("recv", flat[off : off + ln], peer))
            else:
                v = flat.as_strided(
                    (cnt, ln), (int(rows.dst_stride[i]), 1), flat.storage_offset() + off
                )
                packed.setdefault(peer, []).append(v)
    bufs = {
        peer: torch.empty(sum(v.numel() for v in vs), dtype=torch.bfloat16, device=state["device"])
        for peer, vs in packed.items()
    }
    return {"direct": direct, "packed": packed, "bufs": bufs, "send": r < T}


def _cmd_baseline_shards(state: dict) -> float:
    """One update moving only the ranges each inference rank needs (see the module
    docstring); returns this rank's end time."""
    import torch.distributed as dist

    if "shard_ops" not in state:
        state["shard_ops"] = _shard_ops(state)
    so = state["shard_ops"]
    ops = []
    for kind, t, peer in so["direct"]:
        ops.append(dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, peer))
    for peer, views in so["packed"].items():
        buf = so["bufs"][peer]
        if so["send"]:
            o = 0
            for v in views:
                buf[o : o + v.numel()].view(v.shape).copy_(v)
                o += v.numel()
        ops.append(dist.P2POp(dist.isend if so["send"] else dist.irecv, buf, peer))
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    if not so["send"]:
        for peer, views in so["packed"].items():
            buf, o = so["bufs"][peer], 0
            for v in views:
                v.copy_(buf[o : o + v.numel()].view(v.shape))
                o += v.numel()
    _sync(state)
    return time.monotonic()


def _cmd_barrier(state: dict) -> float:
    import torch.distributed as dist

    _sync(state)
    dist.barrier()
    return time.monotonic()


def _cmd_teardown(state: dict) -> None:
    eng = state.get("engine")
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:
        pass
    state.clear()
    if eng is not None:
        eng.stop()


def Workers(n: int, timeout: float = 300.0) -> Pool:  # noqa: N802 (reads as a class)
    """``n`` spawned processes serving this module's ``_cmd_*`` functions."""
    return Pool(n, "bench_weights_gpu", timeout)


class Cluster:
    """Training ranks on workers ``0 .. T-1``, inference ranks on ``T .. T+I-1``, connected."""

    def __init__(self, cfg: dict) -> None:
        self.last_timeline: Dict[str, float] = {}
        self.cfg = cfg
        T, I = cfg["train"], cfg["infer"]  # noqa: E741
        self.tw, self.iw = list(range(T)), list(range(T, T + I))
        self.w = Workers(T + I)
        try:
            per = [{"role": "train", "rank": r} for r in range(T)]
            per += [{"role": "infer", "rank": d} for d in range(I)]
            out = self.w.all(self.tw + self.iw, "setup", per=per, cfg=cfg)
            assert len({o["fingerprint"] for o in out}) == 1
            infos = [o["info"] for o in out]
            hellos: Dict[Tuple[str, int], List[bytes]] = {}
            for h in self.w.all(self.tw, "connect", infos=infos):
                for k, b in h.items():
                    hellos.setdefault(k, []).append(b)
            per_t = [{"hellos": hellos.get(("train", r), [])} for r in range(T)]
            self.w.all(self.tw, "accept", per=per_t)
            per_i = [{"hellos": hellos.get(("infer", d), [])} for d in range(I)]
            self.w.all(self.iw, "accept", per=per_i)
        except BaseException:
            self.w.close()
            raise

    def update(self, v: int) -> Tuple[float, List[dict]]:
        """Pushes version ``v`` from every training rank; returns (seconds until the last
        inference rank counted everything, the senders' phase timings); then releases it."""
        for i in self.iw:
            self.w.send(i, "wait", version=v)
        stats = self.w.all(self.tw, "push", version=v)
        got = [self.w.recv(i) for i in self.iw]
        ends = [e for e, _ in got]
        self.w.all(self.iw, "release", version=v)
        # Where the time went (one host, so one monotonic clock): the senders' start spread,
        # when the last of them finished, how long after that the last receiver had counted
        # everything (count_tail), and until its wait() returned (tail; the difference is the
        # stamps check and the views, check_s).
        start = min(s["t0"] for s in stats)
        done = max(s["t0"] + s["total_s"] for s in stats)
        self.last_timeline = {
            "start_spread_s": max(s["t0"] for s in stats) - start,
            "senders_done_s": done - start,
            "count_tail_s": max(w["counted_at"] for _, w in got) - done,
            "tail_s": max(ends) - done,
            "check_s": max(w["check_s"] for _, w in got),
        }
        return max(ends) - start, stats

    def probe(self, size: int, n: int, imm: int, scatter: bool = False) -> float:
        """Seconds for ``n`` writes of ``size`` bytes (or one scatter of ``n`` items), training
        rank 0 -> inference rank 0, until the receiver counted them all (written into its
        second slot)."""
        tx, rx = self.tw[0], self.iw[0]
        per = self.w.all([tx], "probe_count", size=size)[0]
        self.w.send(rx, "probe_wait", imm=imm, count=per * n)
        time.sleep(0.05)  # the receiver is waiting before the first byte moves
        t0, sent = self.w.all([tx], "probe_send", size=size, n=n, imm=imm, scatter=scatter)[0]
        t1 = self.w.recv(rx)
        if sent != per * n:
            raise RuntimeError(f"probe: {sent} immediates sent, {per * n} expected")
        return t1 - t0

    def baseline(self, port: int, reps: int, shards: bool = True) -> Dict[str, Any]:
        """Both NCCL baselines, ``reps`` updates each after one untimed; seconds per update.
        Returns {"gather_bcast": [...], "shards": [...] or "shards_error": "..."}."""
        T, I = self.cfg["train"], self.cfg["infer"]  # noqa: E741
        idx = self.tw + self.iw
        self.w.all(idx, "dist_init", per=[{"rank": k} for k in range(T + I)], port=port,
                   world=T + I)  # fmt: skip
        res: Dict[str, Any] = {}
        for key, cmd in (("gather_bcast", "baseline"), ("shards", "baseline_shards")):
            if key == "shards" and not shards:
                continue
            out = []
            try:
                for _ in range(reps + 1):
                    starts = self.w.all(idx, "barrier")
                    ends = self.w.all(idx, cmd)
                    out.append(max(ends) - max(starts))
            except Exception as e:  # the other baseline still counts
                if key == "gather_bcast":
                    raise
                res["shards_error"] = f"{type(e).__name__}: {e}"[:300]
                break
            res[key] = out[1:]  # the first one sets up NCCL's communicators
        return res

    def close(self) -> None:
        try:
            self.w.all(self.tw + self.iw, "teardown")
        finally:
            self.w.close()


# ------------------------------------------------------------------------------------------------
# in-process ceilings and stage rates (the parent process)
# ------------------------------------------------------------------------------------------------


def _timed(torch: Any, fn: Any, cuda: bool, reps: int) -> float:
    fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def ceilings(cuda: bool, size: int, peer: str = "cuda:1") -> Dict[str, float]:
    """Peer copy GB/s (cuda:0 -> cuda:1; memcpy on CPU), pinned H2D GB/s, fp8 conversion GB/s
    of bf16 input (tile maxima + conversion, 128 x 128 tiles)."""
    import torch

    from stolon.weights.gpu import quantize_blockwise_torch

    out: Dict[str, float] = {}
    if cuda:
        a = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
        b = torch.empty(size, dtype=torch.uint8, device=peer)
        out["peer_copy_gb_per_s"] = size / _timed(torch, lambda: b.copy_(a), True, 10) / GB
        h = torch.empty(size, dtype=torch.uint8).pin_memory()
        out["h2d_gb_per_s"] = size / _timed(torch, lambda: a.copy_(h), True, 5) / GB
        dev = "cuda:0"
        del a, b, h
    else:
        a = torch.randint(0, 256, (size,), dtype=torch.uint8)
        b = torch.empty_like(a)
        out["peer_copy_gb_per_s"] = size / _timed(torch, lambda: b.copy_(a), False, 3) / GB
        out["h2d_gb_per_s"] = out["peer_copy_gb_per_s"]
        dev = "cpu"
    rows = max(128, (size // 2 // 8192) // 128 * 128)
    x = torch.randn(rows, 8192, device=dev).to(torch.bfloat16)
    t = _timed(torch, lambda: quantize_blockwise_torch(x), cuda, 3)
    out["convert_gb_per_s"] = x.numel() * 2 / t / GB
    x = None
    if cuda:
        torch.cuda.empty_cache()  # the workers need the memory
    return out


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_path(args: argparse.Namespace, path: str, gb: float, cuda: bool, rates: dict) -> dict:
    from stolon.weights import CostModel, build_plan

    T, I = args.train, args.infer  # noqa: E741
    layers, real_gb = model_config(gb, args.hidden, args.ffn, args.vocab)
    devices = [f"cuda:{k}" for k in range(T + I)] if cuda else ["cpu"] * (T + I)
    if cuda and args.same_device:
        devices = ["cuda:0"] * (T + I)
    cfg = {
        "train": T, "infer": I, "hidden": args.hidden, "ffn": args.ffn, "vocab": args.vocab,
        "layers": layers, "fp8": args.fp8, "layout": args.layout, "seed": 3, "path": path,
        "devices": devices, "offload": args.offload, "block": (128, 128),
        "staging_bytes": args.staging_mb << 20, "depth": 3,
    }  # fmt: skip
    train, infer = model_layouts(cfg)
    plan = build_plan(train, infer)
    traffic = CostModel().traffic(plan)
    recv = traffic["recv_bytes"]
    t_setup = time.monotonic()
    c = Cluster(cfg)
    try:
        setup_s = time.monotonic() - t_setup
        probe_big = min((1 << 30) if cuda else (16 << 20), int(recv.min()) // 2)
        # The first write to a region sets up the path (over NVLink: opening the peer's IPC
        # handle, milliseconds); a one-page write first keeps that out of the link rate and out
        # of the small-write latency, which is the median of single writes after it.
        c.probe(4096, 1, 0x5A000020)
        rtt_s = statistics.median(c.probe(4096, 1, 0x5A000021 + k) for k in range(7))
        link_s = c.probe(probe_big, 4, 0x5A000000) / 4
        small_n = 20000 if cuda else 2000
        ops_s = c.probe(4096, small_n, 0x5A000010, scatter=True)
        times, stats, timelines = [], [], []
        c.update(0)  # warm-up: NVLink mappings, allocator, first staged buffers
        for v in range(1, args.repeats + 1):
            t, st = c.update(v)
            times.append(t)
            stats.append(st)
            timelines.append(c.last_timeline)
        ver = c.w.all(c.iw, "verify", version=args.repeats)  # landed and released: intact
        base: Dict[str, Any] = {}
        if path == args.baseline_path and not args.same_device:
            shards_ok = not args.fp8 and not args.offload
            base = c.baseline(_free_port(), args.baseline_repeats, shards=shards_ok)
    finally:
        c.close()
    upd = statistics.median(times)
    per_gpu = float(recv.mean()) / upd / GB
    model = CostModel.calibrated(
        link_gbs=probe_big / link_s / GB,
        ops_per_s=small_n / ops_s,
        rtt_us=rtt_s * 1e6,
        h2d_gbs=rates["h2d_gb_per_s"],
        convert_gbs=rates["convert_gb_per_s"],
        offload=args.offload,
        chunk_bytes=args.staging_mb << 20,
    )
    pred = model.predict(plan)
    row: Dict[str, Any] = {
        "path": path,
        "train": T,
        "infer": I,
        "model_gb_bf16": real_gb,
        "layers": layers,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "layout": args.layout,
        "fp8": args.fp8,
        "offload": args.offload,
        "recv_bytes_per_infer_gpu": float(recv.mean()),
        "send_bytes_per_train_gpu": float(traffic["send_bytes"].mean()),
        "update_s": upd,
        "update_s_all": times,
        "gb_per_s_per_infer_gpu": per_gpu,
        "fraction_of_peer_copy": per_gpu / rates["peer_copy_gb_per_s"],
        "verified_bytes": sum(v["bytes"] for v in ver),
        "verify_errors": [b for v in ver for b in v["bad"]],
        "sender_phases_s": {k: statistics.median([s[0][k] for s in stats]) for k in stats[0][0]},
        "timeline_s": {k: statistics.median(t[k] for t in timelines) for k in timelines[0]},
        "calibration": {
            "link_gb_per_s": probe_big / link_s / GB,
            "link_probe_bytes": probe_big,
            "small_writes_per_s": small_n / ops_s,
            "small_write_latency_us": rtt_s * 1e6,
            "h2d_gb_per_s": rates["h2d_gb_per_s"],
            "convert_gb_per_s": rates["convert_gb_per_s"],
        },
        "model_update_s": pred["update_s"],
        "model_bound": pred["bound"],
        "model_stages_s": pred["stages_s"],
        "model_error": pred["update_s"] / upd - 1,
        "setup_s": setup_s,
    }
    if base:
        b = statistics.median(base["gather_bcast"])
        row.update(
            baseline=("nccl" if cuda else "gloo") + " gather+broadcast",
            baseline_update_s=b,
            baseline_update_s_all=base["gather_bcast"],
            baseline_gb_per_s_per_infer_gpu=float(recv.mean()) / b / GB,
            speedup_over_baseline=b / upd,
        )
        if base.get("shards"):
            b = statistics.median(base["shards"])
            row.update(
                baseline_shards=("nccl" if cuda else "gloo") + " grouped send/recv, shards only",
                baseline_shards_update_s=b,
                baseline_shards_update_s_all=base["shards"],
                baseline_shards_gb_per_s_per_infer_gpu=float(recv.mean()) / b / GB,
                speedup_over_shards_baseline=b / upd,
            )
        elif base.get("shards_error"):
            row["baseline_shards_error"] = base["shards_error"]
        else:
            row["baseline_skipped"] = "shards baseline: bf16 from GPU shards only"
    elif args.same_device and path == args.baseline_path:
        row["baseline_skipped"] = "one GPU: NCCL refuses two ranks on one device"
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--train", type=int, default=None)
    ap.add_argument("--infer", type=int, default=None)
    ap.add_argument("--gb", type=float, default=None, help="bf16 model size (GPU default 8)")
    ap.add_argument("--staged-gb", type=float, default=None, help="size for staged tcp (1)")
    ap.add_argument("--paths", default=None, help="nvlink,staged (GPU) or tcp (CPU)")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--layout", choices=["rows", "tp"], default="rows")
    ap.add_argument("--fp8", action="store_true", help="fp8 e4m3 (128x128 scales) on inference")
    ap.add_argument("--offload", action="store_true", help="training shards in pinned host memory")
    ap.add_argument("--staging-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 repeats")
    ap.add_argument("--gpus", type=int, default=None,
                    help="1: every process on cuda:0 (a smoke run; no NCCL baselines)")  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch

    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.same_device = args.gpus == 1
    cuda = (
        args.device or ("cuda" if ngpu >= 2 or (args.same_device and ngpu) else "cpu")
    ) == "cuda"
    if args.train is None or args.infer is None:
        two = (ngpu >= 4) if cuda else True
        args.train, args.infer = (2, 2) if two and not args.same_device else (1, 1)
    if cuda and args.same_device and ngpu < 1:
        print("needs a GPU", file=sys.stderr)
        return 2
    if cuda and not args.same_device and ngpu < args.train + args.infer:
        print(f"needs {args.train + args.infer} GPUs, {ngpu} visible", file=sys.stderr)
        return 2
    args.hidden = args.hidden or (4096 if cuda else 256)
    args.ffn = args.ffn or (14336 if cuda else 512)
    args.vocab = args.vocab or (32768 if cuda else 1024)
    gb = args.gb if args.gb is not None else (8.0 if cuda else 0.02)
    sgb = args.staged_gb if args.staged_gb is not None else (1.0 if cuda else gb)
    if args.quick:
        gb, sgb = min(gb, 1.0 if cuda else 0.01), min(sgb, 0.25 if cuda else 0.01)
        args.repeats, args.baseline_repeats = 2, 1
    paths = (args.paths or ("nvlink,staged" if cuda else "tcp")).split(",")
    args.baseline_path = paths[0]
    t_all = time.monotonic()
    peer = "cuda:0" if args.same_device else "cuda:1"
    rates = ceilings(cuda, (1 << 30) if cuda else (64 << 20), peer)
    print(json.dumps({"ceilings": rates}), flush=True)
    rows = []
    for path in paths:
        row = run_path(args, path, sgb if path == "staged" else gb, cuda, rates)
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        f"\n== weight update, {args.train} training -> {args.infer} inference processes, "
        f"{'GPU' if cuda else 'CPU'}; peer copy {rates['peer_copy_gb_per_s']:.1f} GB/s, "
        f"H2D {rates['h2d_gb_per_s']:.1f} GB/s, fp8 conversion {rates['convert_gb_per_s']:.0f} GB/s"
    )
    print(
        f"{'path':<8} {'model GB':>8} {'GB/infer':>8} {'s/update':>9} {'GB/s/GPU':>9} "
        f"{'x peer':>7} {'baseline s':>10} {'speedup':>8} {'model s':>8} {'err':>6} "
        f"{'bound':>8} {'exact':>6}"
    )
    for r in rows:
        print(
            f"{r['path']:<8} {r['model_gb_bf16']:>8.2f} {r['recv_bytes_per_infer_gpu'] / GB:>8.2f} "
            f"{r['update_s']:>9.4f} {r['gb_per_s_per_infer_gpu']:>9.2f} "
            f"{r['fraction_of_peer_copy']:>7.3f} {r.get('baseline_update_s', math.nan):>10.4f} "
            f"{r.get('speedup_over_baseline', math.nan):>8.2f} {r['model_update_s']:>8.4f} "
            f"{r['model_error']:>+6.0%} {r['model_bound']:>8} {str(not r['verify_errors']):>6}"
        )
    for r in rows:
        if r.get("baseline_shards_update_s"):
            print(
                f"{r['path']:<8} NCCL shards-only baseline {r['baseline_shards_update_s']:.4f} s "
                f"({r['baseline_shards_gb_per_s_per_infer_gpu']:.1f} GB/s per inference GPU): "
                f"stolon {r['speedup_over_shards_baseline']:.2f}x"
            )
        elif r.get("baseline_shards_error") or r.get("baseline_skipped"):
            print(f"{r['path']:<8} {r.get('baseline_shards_error') or r['baseline_skipped']}")
    print(f"total wall time {time.monotonic() - t_all:.1f} s")
    if args.json:
        meta = benchmeta.meta({"same_device": args.same_device})
        meta.update(
            date=time.strftime("%Y-%m-%d %H:%M:%S"),
            gpus=meta["machine"]["gpus"],
            host_cpus=os.cpu_count(),
        )
        benchmeta.write_json(args.json, {"meta": meta, "ceilings": rates, "rows": rows})
    return 0 if all(not r["verify_errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
