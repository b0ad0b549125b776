#!/usr/bin/env python3
"""GPU-memory transfers between two processes on one host, with baselines from the same run.

- NVLink path (CUDA IPC copies + mailbox immediates) vs an in-process peer copy
  (`cudaMemcpyPeer` through torch), bandwidth for large writes and latency for small ones;
- staged tcp (GPU memory through pinned buffers over `tcp;ofi_rxm`) vs host-memory tcp;
- progress-watcher latency: a CUDA stream writes a host-mapped counter, the engine's worker
  sees it and runs the callback.

Timing is receiver-side: a measurement ends when the receiver has counted every immediate.

    python benchmarks/bench_gpu.py --json gpu.json
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

import gpu_roles  # noqa: E402

MiB = 1 << 20


def peer_copy(torch, size: int, iters: int) -> tuple:
    """In-process GPU0 -> GPU1 copy: (GB/s, median us per copy)."""
    a = torch.randint(0, 256, (size,), dtype=torch.uint8, device="cuda:0")
    b = torch.empty(size, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    bw = size * iters / (time.perf_counter() - t0) / 1e9
    return bw, statistics.median(times) * 1e6


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
    iters = max(20, min(2000, (4 << 30) // size))
    bw = engine_bw(eng, region, rx.gpu_desc, rx, size, iters)
    pbw, plat = peer_copy(torch, size, min(iters, 200))
    return {
        "op": op,
        "size_bytes": size,
        "gb_per_s": bw,
        "peer_copy_gb_per_s": pbw,
        "fraction_of_peer_copy": bw / pbw,
        "peer_copy_latency_us": plat,
    }


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
    args = ap.parse_args()

    import torch

    import stolon

    def parse(s: str) -> int:
        s = s.strip().upper()
        m = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1], 1)
        return int(s[:-1] if s[-1] in "KMG" else s) * m

    sizes = [parse(s) for s in args.sizes.split(",")]
    rows = []
    big = max(sizes)
    rx = gpu_roles.Remote({"device": 1, "size": big, "nvlink": True})
    try:
        torch.cuda.set_device(0)
        eng = gpu_roles.engine(0, True)
        src = torch.randint(0, 256, (big,), dtype=torch.uint8, device="cuda:0")
        region = eng.register(src)
        own = eng.register(torch.zeros(big, dtype=torch.uint8, device="cuda:0"))
        assert eng.path(region, rx.gpu_desc) == "nvlink"
        for size in sizes:
            row = nvlink_row(torch, "nvlink_write", eng, region, rx, size)
            if size <= 64 << 10:
                lat = engine_latency(eng, region, rx.gpu_desc, own.descriptor, rx, size, 100)
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
        {"device": 1, "size": big, "nvlink": True, "alloc_conf": "expandable_segments:True"}
    )
    try:
        eng = gpu_roles.engine(0, True)
        src = torch.randint(0, 256, (big,), dtype=torch.uint8, device="cuda:0")
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
    rx = gpu_roles.Remote({"device": 1, "size": ssize, "nvlink": False})
    try:
        eng = gpu_roles.engine(0, False)
        src = torch.randint(0, 256, (ssize,), dtype=torch.uint8, device="cuda:0")
        g = eng.register(src)
        h = eng.register(src.cpu().numpy())
        assert eng.path(g, rx.gpu_desc) == "staged"
        iters = 20
        rows.append(
            {
                "op": "staged_tcp_gpu_to_gpu",
                "size_bytes": ssize,
                "gb_per_s": engine_bw(eng, g, rx.gpu_desc, rx, ssize, iters, window=4),
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

    lat = watcher_latency(torch, stolon, 500)
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
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "command": " ".join(sys.argv),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
