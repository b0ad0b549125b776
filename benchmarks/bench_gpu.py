#!/usr/bin/env python3
"""GPU-memory transfers between two processes on one host, with baselines from the same run.

- NVLink path (CUDA IPC copies + mailbox immediates) vs an in-process peer copy
  (`cudaMemcpyPeer` through torch), bandwidth for large writes and latency for small ones;
- staged tcp (GPU memory through pinned buffers over `tcp;ofi_rxm`) vs host-memory tcp;
- progress-watcher latency: a CUDA stream writes a host-mapped counter, the engine's worker
  sees it and runs the callback.

Timing is receiver-side: a measurement ends when the receiver has counted every immediate.
After each bandwidth row the receiver's bytes are compared with the source (sha256).

Peer-copy baselines, same sizes, same run: "copy + sync" (each `copy_` followed by a
synchronisation: latency-bound below a few MiB, as first published), "events around a batch"
(CUDA events around N back-to-back copies on one stream) and "graph" (the N copies captured in
one CUDA graph and replayed between events: no per-copy launch from Python).

With one GPU (`--gpus 1`, the default when one is visible) the receiver process runs on the
same device: the engine still takes its CUDA IPC path between the two processes, and the
"peer copy" is a copy within that GPU, so the numbers are a smoke test, not an NVLink figure.

    python benchmarks/bench_gpu.py --json gpu.json
    python benchmarks/bench_gpu.py --gpus 1 --quick --json smoke.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmeta  # noqa: E402
import gpu_roles  # noqa: E402

MiB = 1 << 20


PEER = 1  # the receiver's device (0 with --gpus 1)


def peer_copy(torch, size: int, iters: int) -> tuple:
    """In-process GPU0 -> GPU PEER copy: (GB/s, median us per copy), each copy synchronised."""
    a = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
    b = torch.empty(size, dtype=torch.uint8, device=f"cuda:{PEER}")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(PEER)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(PEER)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(PEER)
    bw = size * iters / (time.perf_counter() - t0) / 1e9
    return bw, statistics.median(times) * 1e6


def peer_copy_batched(torch, size: int, n: int) -> dict:
    """GPU0 -> GPU PEER copies not bound by Python launches: GB/s with CUDA events around `n`
    back-to-back copies on one stream, and with the `n` copies captured in one CUDA graph
    (median of 5 batches each)."""
    a = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
    b = torch.empty(size, dtype=torch.uint8, device=f"cuda:{PEER}")
    out: dict = {}
    s = torch.cuda.Stream(device=0)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def batch() -> None:
        for _ in range(n):
            b.copy_(a, non_blocking=True)

    with torch.cuda.stream(s):
        batch()
        s.synchronize()
        ts = []
        for _ in range(5):
            e0.record(s)
            batch()
            e1.record(s)
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
    out["peer_copy_batched_gb_per_s"] = size * n / statistics.median(ts) / 1e9
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):
            s.synchronize()
            with torch.cuda.graph(g, stream=s):
                batch()
            g.replay()
            s.synchronize()
            ts = []
            for _ in range(5):
                e0.record(s)
                g.replay()
                e1.record(s)
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) / 1e3)
        out["peer_copy_graph_gb_per_s"] = size * n / statistics.median(ts) / 1e9
    except Exception as e:  # reported, the eager batch stands
        out["peer_copy_graph_error"] = f"{type(e).__name__}: {e}"
    out["peer_copy_batch"] = n
    return out


def engine_bw(eng, region, desc, rx, size: int, iters: int, window: int = 8) -> float:
    # One untimed write first: the first write to a peer sets up its path (opening an IPC
    # handle, or fetching and mapping VMM allocations over the owner's socket: milliseconds).
    # Its immediate (4) is one the receiver does not count here.
    eng.write(region, 0, desc, 0, size, imm=4).wait(60)
    per = eng.imm_count_for(region, desc, size)
    rx.expect(3, per * iters, timeout=120)
    t0 = time.perf_counter()
    inflight = []
    for _ in range(iters):
        inflight.append(eng.write(region, 0, desc, 0, size, imm=3))
        if len(inflight) >= window:
            inflight.pop(0).wait(60)
    for f in inflight:
        f.wait(60)
    t_end = rx.result()
    return size * iters / (t_end - t0) / 1e9


def nvlink_row(torch, op: str, eng, region, rx, size: int) -> dict:
    """One bandwidth row: the engine's NVLink writes of `size` bytes next to a peer copy of the
    same size measured right after."""
    iters = max(20, min(ITERS_MAX, (4 << 30) // size))
    bw = engine_bw(eng, region, rx.gpu_desc, rx, size, iters)
    pbw, plat = peer_copy(torch, size, min(iters, 200))
    row = {
        "op": op,
        "size_bytes": size,
        "gb_per_s": bw,
        "peer_copy_gb_per_s": pbw,
        "fraction_of_peer_copy": bw / pbw,
        "peer_copy_latency_us": plat,
    }
    row.update(peer_copy_batched(torch, size, max(8, min(1000, (2 << 30) // size))))
    best = max(v for k, v in row.items() if k.startswith("peer_copy") and k.endswith("gb_per_s"))
    row["fraction_of_best_peer_copy"] = bw / best
    row["verified"] = rx.call("sha", 0, size, "gpu") == gpu_roles.sha(region_tensor(size))
    return row


SRC = {}  # the writer's source tensor, for the bytes check


def region_tensor(size: int):
    return SRC["t"][:size]


ITERS_MAX = 2000


def engine_latency(eng, region, desc, own_desc, rx, size: int, samples: int) -> list:
    per_sample = 10
    out = []
    for _ in range(samples):
        rx.call("echo", size, per_sample, own_desc.to_bytes())
        eng.trigger_write(2, per_sample - 1, region, 0, desc, 0, size, reply_imm=1)
        t0 = time.perf_counter()
        eng.write(region, 0, desc, 0, size, imm=1)
        eng.wait_imm(2, 1, timeout=30)
        out.append((time.perf_counter() - t0) / (2 * per_sample) * 1e6)
    return sorted(out)


def watcher_latency(torch, stolon, n: int) -> list:
    with stolon.TransferEngine("tcp", 1, nodes=["127.0.0.1"], cuda_device=0) as eng:
        c = stolon.HostCounter(device=0)
        got = {}
        ev = threading.Event()

        def cb(old: int, new: int) -> None:
            got[new] = time.perf_counter()
            ev.set()

        eng.watch(c, [], callback=cb)
        stream = torch.cuda.Stream(device=0)
        lat = []
        for i in range(1, n + 1):
            ev.clear()
            t0 = time.perf_counter()
            c.write_from_stream(i, stream.cuda_stream)
            if not ev.wait(5):
                raise TimeoutError("watcher callback did not run")
            lat.append((got[i] - t0) * 1e6)
        return sorted(lat)


def pct(xs: list, p: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="4K,64K,1M,16M,64M,256M")
    ap.add_argument("--json")
    ap.add_argument("--staged-size", default="64M")
    ap.add_argument("--gpus", type=int, default=None,
                    help="2: writer on GPU 0, receiver on GPU 1 (default with 2+ GPUs); "
                    "1: both processes on GPU 0")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: sizes 4K,1M,64M, fewer iterations and samples")  # fmt: skip
    args = ap.parse_args()

    import torch

    import stolon

    global PEER, ITERS_MAX
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = args.gpus or min(ngpu, 2)
    if gpus < 1 or gpus > ngpu:
        print(f"needs {max(gpus, 1)} GPU(s), {ngpu} visible", file=sys.stderr)
        return 2
    PEER = 1 if gpus >= 2 else 0
    if args.quick:
        args.sizes = "4K,1M,64M" if args.sizes == ap.get_default("sizes") else args.sizes
        ITERS_MAX = 200
    lat_samples, watch_n, staged_iters = (20, 100, 5) if args.quick else (100, 500, 20)

    def parse(s: str) -> int:
        s = s.strip().upper()
        m = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1], 1)
        return int(s[:-1] if s[-1] in "KMG" else s) * m

    sizes = [parse(s) for s in args.sizes.split(",")]
    rows = []
    big = max(sizes)
    rx = gpu_roles.Remote({"device": PEER, "size": big, "nvlink": True})
    try:
        torch.cuda.set_device(0)
        eng = gpu_roles.engine(0, True)
        src = torch.randint(0, 256, (big,), dtype=torch.uint8, device="cuda:0")
        SRC["t"] = src
        region = eng.register(src)
        own = eng.register(torch.zeros(big, dtype=torch.uint8, device="cuda:0"))
        assert eng.path(region, rx.gpu_desc) == "nvlink"
        for size in sizes:
            row = nvlink_row(torch, "nvlink_write", eng, region, rx, size)
            if size <= 64 << 10:
                lat = engine_latency(
                    eng, region, rx.gpu_desc, own.descriptor, rx, size, lat_samples
                )
                row["latency_p50_us"] = pct(lat, 0.5)
                row["latency_p99_us"] = pct(lat, 0.99)
            rows.append(row)
            print(json.dumps(row), flush=True)
        eng.stop()
    finally:
        rx.close()

    # The same NVLink write into VMM memory (a receiver on expandable segments: allocations
    # passed as file descriptors over the owner's socket), at the largest size.
    rx = gpu_roles.Remote(
        {"device": PEER, "size": big, "nvlink": True, "alloc_conf": "expandable_segments:True"}
    )
    try:
        eng = gpu_roles.engine(0, True)
        src = torch.randint(0, 256, (big,), dtype=torch.uint8, device="cuda:0")
        SRC["t"] = src
        region = eng.register(src)
        assert eng.path(region, rx.gpu_desc) == "nvlink", rx.info
        row = nvlink_row(torch, "nvlink_write_vmm", eng, region, rx, big)
        rows.append(row)
        print(json.dumps(row), flush=True)
        eng.stop()
    finally:
        rx.close()

    # Staged tcp vs host tcp, same engines' settings.
    ssize = parse(args.staged_size)
    rx = gpu_roles.Remote({"device": PEER, "size": ssize, "nvlink": False})
    try:
        eng = gpu_roles.engine(0, False)
        src = torch.randint(0, 256, (ssize,), dtype=torch.uint8, device="cuda:0")
        g = eng.register(src)
        h = eng.register(src.cpu().numpy())
        assert eng.path(g, rx.gpu_desc) == "staged"
        iters = staged_iters
        rows.append(
            {
                "op": "staged_tcp_gpu_to_gpu",
                "size_bytes": ssize,
                "gb_per_s": engine_bw(eng, g, rx.gpu_desc, rx, ssize, iters, window=4),
                "verified": rx.call("sha", 0, ssize, "gpu") == gpu_roles.sha(src),
            }
        )
        rows.append(
            {
                "op": "tcp_host_to_host",
                "size_bytes": ssize,
                "gb_per_s": engine_bw(eng, h, rx.host_desc, rx, ssize, iters, window=4),
            }
        )
        for r in rows[-2:]:
            print(json.dumps(r), flush=True)
        eng.stop()
    finally:
        rx.close()

    lat = watcher_latency(torch, stolon, watch_n)
    rows.append(
        {
            "op": "watcher_stream_write_to_callback",
            "latency_p50_us": pct(lat, 0.5),
            "latency_p99_us": pct(lat, 0.99),
        }
    )
    print(json.dumps(rows[-1]), flush=True)

    print("\n== summary")
    for r in rows:
        print(
            f"{r['op']:<34} {r.get('size_bytes', ''):>10} "
            f"{r.get('gb_per_s', float('nan')):>9.2f} GB/s  "
            f"peer {r.get('peer_copy_gb_per_s', float('nan')):>8.2f}  "
            f"frac {r.get('fraction_of_peer_copy', float('nan')):>5.2f}  "
            f"p50 {r.get('latency_p50_us', float('nan')):>8.1f} us  "
            f"p99 {r.get('latency_p99_us', float('nan')):>8.1f} us  "
            f"peer-lat {r.get('peer_copy_latency_us', float('nan')):>7.1f} us"
        )
    bad = [r["op"] + " " + str(r.get("size_bytes")) for r in rows if r.get("verified") is False]
    print("bytes check: " + ("ok" if not bad else "FAILED: " + ", ".join(bad)))
    if args.json:
        meta = benchmeta.meta({"gpus_used": gpus, "same_device": PEER == 0})
        # the old keys, for readers of the first files
        meta.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), gpus=meta["machine"]["gpus"])
        benchmeta.write_json(args.json, {"meta": meta, "rows": rows})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
