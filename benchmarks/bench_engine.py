#!/usr/bin/env python3
"""Bandwidth, message-rate and latency of the transfer engine between two processes.

Like a fabric debug tool: a writer process and a receiver process on this machine, one engine
each. For every (op, size) it reports Gbit/s, operations/s and latency, and measures in the same
run the baselines it is judged against: loopback TCP with iperf3 (single stream) and memcpy.

    python benchmarks/bench_engine.py --provider tcp --domains 1 --json out.json

Timing is receiver-side: a measurement ends when the receiver has counted every immediate, i.e.
when the data has landed, not when the sender's operations completed locally.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np

KiB = 1 << 10
MiB = 1 << 20


def _engine(args: Dict[str, Any]):
    from stolon import TransferEngine
    from stolon.engine import loopback_nodes

    p, n = args["provider"], args["domains"]
    extra = {"max_op_bytes": args["max_op"]} if args.get("max_op") else {}
    return TransferEngine(
        p, n, nodes=loopback_nodes(p, n), min_shard_bytes=args["min_shard"], **extra
    )


def receiver(args: Dict[str, Any], conn) -> None:
    """Child: registers a buffer, then serves commands from the writer."""
    eng = _engine(args)
    buf = np.zeros(args["buffer"], dtype=np.uint8)
    region = eng.register(buf)
    conn.send((eng.address.to_bytes(), region.descriptor.to_bytes()))
    peer_desc = None
    while True:
        cmd = conn.recv()
        op = cmd[0]
        if op == "expect":
            _, imm, count = cmd
            eng.wait_imm(imm, count, timeout=300)
            conn.send(time.perf_counter())
        elif op == "peer":
            from stolon import MemoryDescriptor

            peer_desc = MemoryDescriptor.from_bytes(cmd[1])
            conn.send("ok")
        elif op == "echo":
            # Arm a worker-side reflex: every arrival of imm 1 writes `size` bytes back with 2.
            _, size, times = cmd
            eng.trigger_write(1, times, region, 0, peer_desc, 0, size, reply_imm=2)
            conn.send("ok")
        elif op == "stop":
            eng.stop()
            conn.send("bye")
            return


def memcpy_gbps(size: int = 256 * MiB, reps: int = 5) -> float:
    a = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return size * 8 / best / 1e9


def iperf3_gbps(seconds: int = 3) -> float | None:
    if not shutil.which("iperf3"):
        return None
    port = "5299"
    srv = subprocess.Popen(
        ["iperf3", "-s", "-1", "-p", port], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["iperf3", "-c", "127.0.0.1", "-p", port, "-t", str(seconds), "-J"],
            capture_output=True,
            text=True,
            timeout=seconds + 20,
        )
        data = json.loads(out.stdout)
        return data["end"]["sum_received"]["bits_per_second"] / 1e9
    except Exception:
        return None
    finally:
        srv.kill()
        srv.wait()


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    cfg = {
        "provider": args.provider,
        "domains": args.domains,
        "buffer": max(max(args.sizes) * 2, 16384 * 64, args.latency_bytes),
        "min_shard": args.min_shard,
        "max_op": args.max_op,
    }
    proc = ctx.Process(target=receiver, args=(cfg, child), daemon=True)
    proc.start()
    rows: List[Dict[str, Any]] = []
    try:
        from stolon import MemoryDescriptor

        eng = _engine(cfg)
        _addr, desc_bytes = parent.recv()
        desc = MemoryDescriptor.from_bytes(desc_bytes)
        src = np.random.default_rng(1).integers(0, 256, cfg["buffer"], dtype=np.uint8)
        region = eng.register(src)
        base = {"provider": args.provider, "domains": args.domains}

        def expect(imm: int, count: int) -> None:
            parent.send(("expect", imm, count))

        def bandwidth(op: str, size: int) -> Dict[str, Any]:
            total_target = max(args.min_bytes, size * 8)
            n = max(args.min_iters, total_target // size)
            window = max(2, min(64, (64 * MiB) // size))
            if op == "single":
                per = eng.imm_count_write(size)
            else:
                page = args.page_bytes
                pages = size // page
                per = eng.imm_count_paged(pages, page)
                src_pages = list(range(pages))
                dst_pages = list(range(pages))[::-1]
            expect(7, per * n)
            t0 = time.perf_counter()
            inflight = []
            for _ in range(n):
                if op == "single":
                    f = eng.write(region, 0, desc, 0, size, imm=7)
                else:
                    f = eng.write_paged(region, desc, page, src_pages, dst_pages, imm=7)
                inflight.append(f)
                if len(inflight) >= window:
                    inflight.pop(0).wait(60)
            for f in inflight:
                f.wait(60)
            t_end = parent.recv()
            dt = t_end - t0
            return {
                **base,
                "op": op,
                "size_bytes": size,
                "iterations": n,
                "gbit_per_s": size * n * 8 / dt / 1e9,
                "ops_per_s": per * n / dt,
                "p50_us": None,
            }

        for size in args.sizes:
            rows.append(bandwidth("single", size))
            if size >= args.page_bytes * 4 and "paged" in args.ops:
                rows.append(bandwidth("paged", size))
            print_row(rows[-1], flush=True)

        # Message rate: many 64-byte writes with immediates, posted as paged writes.
        if "rate" in args.ops:
            pages = 16384
            n = args.rate_batches
            expect(8, pages * n)
            t0 = time.perf_counter()
            fs = [
                eng.write_paged(region, desc, 64, list(range(pages)), list(range(pages)), imm=8)
                for _ in range(n)
            ]
            for f in fs:
                f.wait(60)
            dt = parent.recv() - t0
            rows.append(
                {
                    **base,
                    "op": "write64_imm_rate",
                    "size_bytes": 64,
                    "iterations": pages * n,
                    "gbit_per_s": 64 * pages * n * 8 / dt / 1e9,
                    "ops_per_s": pages * n / dt,
                    "p50_us": None,
                }
            )
            print_row(rows[-1], flush=True)

        # Latency: ping-pong driven by worker-side triggers on both ends, 4 KiB each way.
        if "latency" in args.ops:
            parent.send(("peer", region.descriptor.to_bytes()))
            parent.recv()
            size = args.latency_bytes
            per_sample = 10
            samples = []
            for _ in range(args.latency_samples):
                parent.send(("echo", size, per_sample))
                parent.recv()
                # Our own reflex replies to the first per_sample-1 echoes; the last one is
                # counted instead.
                eng.trigger_write(2, per_sample - 1, region, 0, desc, 0, size, reply_imm=1)
                t0 = time.perf_counter()
                eng.write(region, 0, desc, 0, size, imm=1, pin_domain=0)
                eng.wait_imm(2, 1, timeout=30)
                samples.append((time.perf_counter() - t0) / (2 * per_sample) * 1e6)
            samples.sort()
            rows.append(
                {
                    **base,
                    "op": "latency_half_rtt",
                    "size_bytes": size,
                    "iterations": len(samples) * per_sample,
                    "gbit_per_s": None,
                    "ops_per_s": None,
                    "p50_us": samples[len(samples) // 2],
                    "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
                }
            )
            print_row(rows[-1], flush=True)
        parent.send(("stop",))
        parent.recv()
        eng.stop()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return rows


def fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_row(r: Dict[str, Any], flush: bool = False) -> None:
    print(
        f"{r['op']:<18} {r['provider']:<6} {r['domains']:>2} {r['size_bytes']:>10} "
        f"{fmt(r['gbit_per_s'], '10.2f')} {fmt(r['ops_per_s'], '12.0f')} "
        f"{fmt(r['p50_us'], '8.2f')} {fmt(r.get('frac_iperf3'), '7.2f')} "
        f"{fmt(r.get('frac_memcpy'), '7.2f')}",
        flush=flush,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--provider", default="tcp")
    p.add_argument("--domains", type=int, default=1)
    p.add_argument(
        "--sizes",
        default="4K,64K,1M,16M,64M",
        help="comma list of write sizes (K/M suffixes), default 4 KiB .. 64 MiB",
    )
    p.add_argument("--ops", default="single,paged,rate,latency")
    p.add_argument("--page-bytes", type=int, default=16 * KiB)
    p.add_argument("--min-bytes", type=int, default=512 * MiB, help="bytes per bandwidth row")
    p.add_argument("--min-iters", type=int, default=200)
    p.add_argument("--min-shard", type=int, default=1 * MiB)
    p.add_argument("--max-op", type=int, default=0, help="largest single op (0: engine default)")
    p.add_argument("--rate-batches", type=int, default=20)
    p.add_argument("--latency-bytes", type=int, default=4 * KiB)
    p.add_argument("--latency-samples", type=int, default=300)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--json", help="write results here")
    args = p.parse_args()

    def parse_size(s: str) -> int:
        s = s.strip().upper()
        mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(s[-1], 1)
        return int(s[:-1] if s[-1] in "KMG" else s) * mult

    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.ops = set(args.ops.split(","))

    baselines: Dict[str, Any] = {}
    if not args.no_baselines:
        baselines["iperf3_gbit_per_s"] = iperf3_gbps()
        baselines["memcpy_gbit_per_s"] = memcpy_gbps()
        print(
            f"baselines: iperf3 loopback single stream "
            f"{fmt(baselines['iperf3_gbit_per_s'], '.2f')} Gbit/s, "
            f"memcpy {baselines['memcpy_gbit_per_s']:.2f} Gbit/s"
        )
    print(
        f"{'op':<18} {'prov':<6} {'d':>2} {'size_bytes':>10} {'gbit/s':>10} {'ops/s':>12} "
        f"{'p50_us':>8} {'/iperf':>7} {'/memcpy':>7}"
    )
    rows = run(args)
    for r in rows:
        if r["gbit_per_s"] is not None:
            if baselines.get("iperf3_gbit_per_s"):
                r["frac_iperf3"] = r["gbit_per_s"] / baselines["iperf3_gbit_per_s"]
            if baselines.get("memcpy_gbit_per_s"):
                r["frac_memcpy"] = r["gbit_per_s"] / baselines["memcpy_gbit_per_s"]
    print("\nsummary")
    for r in rows:
        print_row(r)
    if args.json:
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "command": " ".join(sys.argv),
            "baselines": baselines,
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
