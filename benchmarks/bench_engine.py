#!/usr/bin/env python3
"""The CPU transfer engine between two processes on this machine, with its baselines, in one run.

    python benchmarks/bench_engine.py --json docs/data/engine_$(date -u +%F).json
    python benchmarks/bench_engine.py --quick            # a smoke run of every part (seconds)

A writer (this process) and a receiver (a spawned process) hold one engine each, one domain,
over loopback; descriptors and addresses travel between them as bytes over a pipe. One run
measures, per provider (``tcp`` = ``tcp;ofi_rxm``, ``shm``, ``udp`` = ``udp;ofi_rxd``):

1. throughput of single writes with an immediate at both completion levels (``delivered``: a
   future succeeds once the bytes are in the target's memory; ``local``: once the source may
   be reused), sizes 64 KiB - 64 MiB (udp: 64 KiB and 1 MiB), a window of writes in flight;
   medians and spread over repeats. A repeat ends when the writer's futures have all resolved
   *and* the receiver has counted every immediate (so ``local`` is not flattered by completing
   early). Every repeat is verified: the receiver zeroes its buffer first, the writes cycle
   over distinct source / destination slots, the receiver's CRC-32 of the written range must
   equal the source's, and the immediates must be counted exactly (``wait_imm`` consumes the
   expected number, none may be left over).
2. baselines in the same run: iperf3 single stream on loopback at its default write size and
   with ``-l 1M`` (the better is "the ceiling" for tcp), and memcpy (numpy ``copyto``) of the
   same sizes, the ceiling for shm.
3. latency: one 4 KiB write at a time (no immediate), post -> future resolved, at each level.
4. plain writes (no immediate) into an idle target (its main thread blocked reading a pipe, no
   Python loop) against writes with immediates, tcp, delivered, 64 KiB and 1 MiB, repeats
   alternating between the two; both timed the same way (post -> every future delivered),
   both verified by CRC, the immediates counted exactly.
5. idle CPU: a process holding an engine (fresh, and one that has been written to) sleeping
   for 10 s; its CPU seconds (getrusage, all threads) / wall seconds, in % of one core.

Targets (stored in the JSON with the measured value and whether each is met; nothing is
asserted): tcp delivered 64 MiB >= 1.0 x the iperf3 ceiling; shm delivered 64 MiB >= 0.6 x
memcpy of 64 MiB; tcp delivered 4 KiB p50 <= 20 us; plain writes >= 0.9 x writes with
immediates at 64 KiB and up; an idle engine <= 1 % of a core.

The JSON is in report.py's generic layout (rows with ``series``, ``size_bytes`` and metrics as
benchmeta.spread() dicts; ``baselines``; ``targets``); ``python benchmarks/report.py`` turns it
into the tables and plot of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmeta  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
LEVELS = ("delivered", "local")
PROVIDER_NAMES = {"tcp": "tcp;ofi_rxm", "shm": "shm", "udp": "udp;ofi_rxd"}

T_THROUGHPUT = "Throughput: single writes with an immediate, Gbit/s (window in flight)"
T_LATENCY = "Latency: one 4 KiB write (no immediate) at a time, post -> future resolved, us"
T_PLAIN = "Plain writes into an idle target vs writes with immediates (tcp, delivered)"
T_IDLE = "Idle CPU: a process holding an engine, asleep"

TARGETS = {
    "tcp_vs_iperf3": 1.0,  # tcp delivered 64 MiB / iperf3 ceiling >=
    "shm_vs_memcpy": 0.6,  # shm delivered 64 MiB / memcpy 64 MiB >=
    "tcp_4k_p50_us": 20.0,  # tcp delivered 4 KiB p50 <=
    "plain_vs_imm": 0.9,  # plain / with immediates, 64 KiB+ >=
    "idle_cpu_pct": 1.0,  # idle engine, % of a core <=
}


def _engine(provider: str, timeout: float = 60.0):
    from stolon import TransferEngine
    from stolon.engine import loopback_nodes

    return TransferEngine(provider, 1, nodes=loopback_nodes(provider, 1), timeout=timeout)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------------------
# the receiver (target) process
# ------------------------------------------------------------------------------------------------


def receiver(provider: str, nbytes: int, conn) -> None:
    """Child: registers ``nbytes``, then serves the writer's commands over ``conn``.

    Between commands its main thread is blocked in ``conn.recv()``: the target is idle apart
    from its engine's worker.
    """
    eng = _engine(provider)
    buf = np.zeros(nbytes, dtype=np.uint8)
    region = eng.register(buf)
    conn.send((eng.address.to_bytes(), region.descriptor.to_bytes()))
    while True:
        cmd = conn.recv()
        op = cmd[0]
        if op == "clear":  # zero the first n bytes
            buf[: cmd[1]] = 0
            conn.send("ok")
        elif op == "expect":  # block until imm arrived count times; reply the time it did
            _, imm, count = cmd
            conn.send("armed")
            try:
                eng.wait_imm(imm, count, timeout=300)
                conn.send(("ok", time.perf_counter()))
            except Exception as e:  # reported, the writer decides
                conn.send(("error", repr(e)))
        elif op == "check":  # CRC-32 of the first n bytes, and leftover arrivals of imm
            _, n, imm = cmd
            left = eng.imm_count(imm) if imm is not None else 0
            conn.send((zlib.crc32(memoryview(buf)[:n]), left))
        elif op == "stats":
            conn.send(eng.stats())
        elif op == "stop":
            eng.stop()
            conn.send("bye")
            return


class Peer:
    """The writer's side of one receiver process, plus the writer's own engine and source."""

    def __init__(self, provider: str, nbytes: int) -> None:
        from stolon import MemoryDescriptor

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=receiver, args=(provider, nbytes, child), daemon=True)
        self.proc.start()
        self.provider = provider
        self.eng = _engine(provider)
        _addr, desc = self.conn.recv()
        self.desc = MemoryDescriptor.from_bytes(desc)
        self.src = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8)
        self.region = self.eng.register(self.src)
        self.nbytes = nbytes
        self.next_imm = 100
        self._crc: Dict[int, int] = {}

    def call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        return self.conn.recv()

    def imm(self) -> int:
        self.next_imm += 1
        return self.next_imm

    def crc(self, n: int) -> int:
        if n not in self._crc:
            self._crc[n] = zlib.crc32(memoryview(self.src)[:n])
        return self._crc[n]

    def close(self) -> Dict[str, Any]:
        stats = {"writer": self.eng.stats()}
        try:
            stats["receiver"] = self.call("stats")
            self.call("stop")
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
            self.eng.stop()
        return stats


def run_writes(
    peer: Peer,
    size: int,
    n: int,
    level: str,
    with_imm: bool,
    window: int,
    sender_time: bool = False,
) -> Tuple[float, Dict[str, Any]]:
    """``n`` writes of ``size`` bytes; returns (seconds, verification record).

    The time ends when every future has resolved and (with immediates, unless
    ``sender_time``) the receiver has counted every immediate.

    Writes cycle over ``slots`` distinct slots (source offset == destination offset), so the
    destination's first ``slots * size`` bytes must equal the source's afterwards.
    """
    slots = max(1, min(n, peer.nbytes // size))
    span = slots * size
    peer.call("clear", span)
    imm = peer.imm() if with_imm else None
    per = peer.eng.imm_count_write(size) if with_imm else 0
    if with_imm:
        peer.conn.send(("expect", imm, per * n))
        assert peer.conn.recv() == "armed"
    eng, region, desc = peer.eng, peer.region, peer.desc
    inflight: List[Any] = []
    t0 = time.perf_counter()
    for i in range(n):
        off = (i % slots) * size
        inflight.append(eng.write(region, off, desc, off, size, imm=imm, completion=level))
        if len(inflight) >= window:
            inflight.pop(0).wait(120)
    for f in inflight:
        f.wait(120)
    t_send = time.perf_counter()
    t_end = t_send
    errors: List[str] = []
    if with_imm:
        status, t_recv = peer.conn.recv()
        if status != "ok":
            errors.append(f"wait_imm: {t_recv}")
        elif not sender_time:
            t_end = max(t_send, t_recv)
    crc, left = peer.call("check", span, imm)
    if crc != peer.crc(span):
        errors.append(f"crc mismatch over {span} bytes")
    if left:
        errors.append(f"{left} immediates left over")
    check = {"bytes_checked": span, "imms_expected": per * n, "errors": errors}
    return t_end - t0, check


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------


def memcpy_samples(size: int, repeats: int, min_bytes: int) -> List[float]:
    """Gbit/s of numpy copyto of ``size`` bytes, one sample per repeat (>= min_bytes copied)."""
    a = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    k = max(1, min_bytes // size)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            np.copyto(b, a)
        out.append(size * k * 8 / (time.perf_counter() - t0) / 1e9)
    assert np.array_equal(a, b)
    return out


def iperf3_gbps(seconds: float, length: Optional[str], port: int = 5299) -> Optional[float]:
    """One iperf3 single-stream run on loopback (received Gbit/s), or None without iperf3."""
    if not shutil.which("iperf3"):
        return None
    srv = subprocess.Popen(
        ["iperf3", "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"]
        if length:
            cmd += ["-l", length]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 20)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except Exception:
        return None
    finally:
        srv.kill()
        srv.wait()


# ------------------------------------------------------------------------------------------------
# idle CPU
# ------------------------------------------------------------------------------------------------


def idle_child(provider: str, seconds: float, connect: Optional[bytes], conn) -> None:
    """Child: an engine with a registered buffer (written to once by a peer when ``connect``),
    then ``seconds`` of sleep; replies CPU seconds of the process and wall seconds."""
    eng = _engine(provider)
    buf = np.zeros(MiB, dtype=np.uint8)
    region = eng.register(buf)
    conn.send(region.descriptor.to_bytes())
    if conn.recv() == "written":
        eng.wait_imm(1, eng.imm_count_write(MiB), timeout=30)
    time.sleep(0.5)  # let the connection settle
    c0, t0 = _cpu_s(), time.perf_counter()
    time.sleep(seconds)
    conn.send((_cpu_s() - c0, time.perf_counter() - t0))
    eng.stop()


def idle_cpu(providers: List[str], seconds: float) -> List[Dict[str, Any]]:
    """All idle processes sleep at once: per provider a fresh engine and one written to."""
    from stolon import MemoryDescriptor

    ctx = mp.get_context("spawn")
    procs = []
    writers = {}
    for p in providers:
        for state in ("fresh", "after traffic"):
            a, b = ctx.Pipe()
            pr = ctx.Process(target=idle_child, args=(p, seconds, None, b), daemon=True)
            pr.start()
            desc = MemoryDescriptor.from_bytes(a.recv())
            if state == "after traffic":
                eng = writers.setdefault(p, _engine(p))
                src = eng.register(np.ones(MiB, dtype=np.uint8))
                for _ in range(4):
                    eng.write(src, 0, desc, 0, MiB).wait(30)
                eng.write(src, 0, desc, 0, MiB, imm=1).wait(30)
                a.send("written")
            else:
                a.send("fresh")
            procs.append((p, state, a, pr))
    rows = []
    for p, state, a, pr in procs:
        cpu, wall = a.recv()
        pr.join(10)
        rows.append(
            {
                "table": T_IDLE,
                "series": f"idle {p} engine, {state}",
                "provider": p,
                "state": state,
                "idle_s": wall,
                "cpu_s": cpu,
                "idle_cpu_pct": 100 * cpu / wall,
            }
        )
    for eng in writers.values():
        eng.stop()
    return rows


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


def plan(quick: bool) -> Dict[str, Any]:
    if quick:
        return {
            "providers": {
                "tcp": [64 * KiB, 1 * MiB],
                "shm": [64 * KiB, 1 * MiB],
                "udp": [64 * KiB],
            },  # fmt: skip
            "repeats": {"tcp": 2, "shm": 2, "udp": 2},
            "bytes_per_repeat": {"tcp": 16 * MiB, "shm": 16 * MiB, "udp": 2 * MiB},
            "min_writes": 4,
            "latency_iters": {"tcp": 50, "shm": 50, "udp": 20},
            "ab_sizes": [64 * KiB],
            "ab_repeats": 2,
            "ab_bytes": 16 * MiB,
            "iperf3_runs": 1,
            "iperf3_seconds": 1,
            "idle_s": 1.0,
        }
    return {
        "providers": {
            "tcp": [64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB],
            "shm": [64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB],
            "udp": [64 * KiB, 1 * MiB],
        },  # fmt: skip
        "repeats": {"tcp": 7, "shm": 7, "udp": 5},
        "bytes_per_repeat": {"tcp": 256 * MiB, "shm": 256 * MiB, "udp": 32 * MiB},
        "min_writes": 4,
        "latency_iters": {"tcp": 3000, "shm": 3000, "udp": 300},
        "ab_sizes": [64 * KiB, 1 * MiB],
        "ab_repeats": 7,
        "ab_bytes": 256 * MiB,
        "iperf3_runs": 3,
        "iperf3_seconds": 3,
        "idle_s": 10.0,
    }


def window_for(size: int) -> int:
    return max(2, min(64, (64 * MiB) // size))


def show(row: Dict[str, Any]) -> None:
    parts = [f"{row['series']:<34}", f"{benchmeta_size(row.get('size_bytes')):>8}"]
    for k, v in row.items():
        if isinstance(v, dict) and "median" in v:
            parts.append(f"{k} {v['median']:.2f} (p10 {v['p10']:.2f}, p90 {v['p90']:.2f}"
                         + (f", p99 {v['p99']:.2f})" if k.endswith("_us") else ")"))  # fmt: skip
        elif k.startswith("fraction") and isinstance(v, (int, float)):
            parts.append(f"{k} {v:.3f}")
    if row.get("verified") is not None:
        parts.append("verified" if row["verified"] else "VERIFY FAILED")
    print("  ".join(parts), flush=True)


def benchmeta_size(n: Optional[int]) -> str:
    if n is None:
        return ""
    for unit, s in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{s}"
    return f"{n}B"


def throughput(peer: Peer, p: str, sizes: List[int], cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for size in sizes:
        n = max(cfg["min_writes"], cfg["bytes_per_repeat"][p] // size)
        for level in LEVELS:
            run_writes(peer, size, min(n, 8), level, True, window_for(size))  # warm-up
            samples, errors, checked = [], [], 0
            for _ in range(cfg["repeats"][p]):
                dt, chk = run_writes(peer, size, n, level, True, window_for(size))
                samples.append(size * n * 8 / dt / 1e9)
                errors += chk["errors"]
                checked += chk["bytes_checked"]
            row = {
                "table": T_THROUGHPUT,
                "series": f"{p} {level}",
                "provider": PROVIDER_NAMES[p],
                "completion": level,
                "size_bytes": size,
                "writes_per_repeat": n,
                "window": window_for(size),
                "gbit_per_s": benchmeta.spread(samples),
                "verified": not errors,
                "bytes_crc_checked": checked,
                "imms_counted": peer.eng.imm_count_write(size) * n * len(samples),
            }
            if errors:
                row["errors"] = errors[:5]
            rows.append(row)
            show(row)
    return rows


def latency(peer: Peer, p: str, iters: int) -> List[Dict[str, Any]]:
    rows = []
    size = 4 * KiB
    eng, region, desc = peer.eng, peer.region, peer.desc
    peer.call("clear", size)
    for level in LEVELS:
        for _ in range(max(10, iters // 20)):  # warm-up
            eng.write(region, 0, desc, 0, size, completion=level).wait(30)
        xs = []
        for _ in range(iters):
            t0 = time.perf_counter()
            eng.write(region, 0, desc, 0, size, completion=level).wait(30)
            xs.append((time.perf_counter() - t0) * 1e6)
        crc, _ = peer.call("check", size, None)
        row = {
            "table": T_LATENCY,
            "series": f"{p} {level}",
            "provider": PROVIDER_NAMES[p],
            "completion": level,
            "size_bytes": size,
            "latency_us": benchmeta.spread(xs),
            "verified": crc == peer.crc(size),
        }
        rows.append(row)
        show(row)
    return rows


def plain_vs_imm(peer: Peer, cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for size in cfg["ab_sizes"]:
        n = max(cfg["min_writes"], cfg["ab_bytes"] // size)
        res: Dict[bool, List[float]] = {False: [], True: []}
        errs: Dict[bool, List[str]] = {False: [], True: []}
        for with_imm in (False, True):
            run_writes(peer, size, min(n, 8), "delivered", with_imm, window_for(size))
        for _ in range(cfg["ab_repeats"]):
            for with_imm in (False, True):
                dt, chk = run_writes(peer, size, n, "delivered", with_imm, window_for(size),
                                     sender_time=True)  # fmt: skip
                res[with_imm].append(size * n * 8 / dt / 1e9)
                errs[with_imm] += chk["errors"]
        for with_imm in (False, True):
            row = {
                "table": T_PLAIN,
                "series": "tcp delivered, " + ("with imm" if with_imm else "plain, idle target"),
                "provider": "tcp;ofi_rxm",
                "completion": "delivered",
                "size_bytes": size,
                "writes_per_repeat": n,
                "gbit_per_s": benchmeta.spread(res[with_imm]),
                "verified": not errs[with_imm],
            }
            if errs[with_imm]:
                row["errors"] = errs[with_imm][:5]
            if not with_imm:
                row["fraction_of_with_imm"] = (
                    row["gbit_per_s"]["median"] / benchmeta.spread(res[True])["median"]
                )
            rows.append(row)
            show(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and counts: a smoke run")
    ap.add_argument("--providers", default="tcp,shm,udp")
    ap.add_argument("--json", help="write the results here (report.py's generic layout)")
    ap.add_argument("--note", default="", help="free text stored in meta.note")
    args = ap.parse_args()
    cfg = plan(args.quick)
    providers = [p for p in args.providers.split(",") if p]
    load0 = os.getloadavg()
    busy0 = busy_processes()
    t_start = time.perf_counter()

    baselines: List[Dict[str, Any]] = []
    iperf: Dict[str, List[float]] = {"default": [], "1M": []}
    for _ in range(cfg["iperf3_runs"]):
        for key, length in (("default", None), ("1M", "1M")):
            g = iperf3_gbps(cfg["iperf3_seconds"], length)
            if g is not None:
                iperf[key].append(g)
    for key, label in (("default", "iperf3 -t {t} (default write size)"),
                       ("1M", "iperf3 -t {t} -l 1M")):  # fmt: skip
        if iperf[key]:
            b = {"series": label.format(t=cfg["iperf3_seconds"]),
                 "gbit_per_s": benchmeta.spread(iperf[key])}  # fmt: skip
            baselines.append(b)
            print(f"baseline {b['series']}: {b['gbit_per_s']['median']:.2f} Gbit/s", flush=True)
    ceiling = max((b["gbit_per_s"]["median"] for b in baselines), default=None)
    all_sizes = sorted({s for p in providers for s in cfg["providers"][p]})
    memcpy: Dict[int, float] = {}
    for size in all_sizes:
        s = benchmeta.spread(memcpy_samples(size, 7, 256 * MiB if not args.quick else 16 * MiB))
        memcpy[size] = s["median"]
        baselines.append({"series": "memcpy (numpy copyto)", "size_bytes": size,
                          "gbit_per_s": s})  # fmt: skip
        print(f"baseline memcpy {benchmeta_size(size)}: {s['median']:.2f} Gbit/s", flush=True)

    rows: List[Dict[str, Any]] = []
    lat_rows: List[Dict[str, Any]] = []
    ab_rows: List[Dict[str, Any]] = []
    stats: Dict[str, Any] = {}
    for p in providers:
        sizes = cfg["providers"][p]
        peer = Peer(p, max(2 * max(sizes), MiB))
        try:
            print(f"--- {PROVIDER_NAMES[p]}", flush=True)
            rows += throughput(peer, p, sizes, cfg)
            lat_rows += latency(peer, p, cfg["latency_iters"][p])
            if p == "tcp":
                ab_rows += plain_vs_imm(peer, cfg)
        finally:
            stats[p] = peer.close()
    for r in rows:
        if r["provider"] == "tcp;ofi_rxm" and ceiling:
            r["fraction_of_iperf3_ceiling"] = r["gbit_per_s"]["median"] / ceiling
        if r["provider"] == "shm" and memcpy.get(r["size_bytes"]):
            r["fraction_of_memcpy"] = r["gbit_per_s"]["median"] / memcpy[r["size_bytes"]]

    print("--- idle", flush=True)
    idle_rows = idle_cpu([p for p in ("tcp", "shm") if p in providers], cfg["idle_s"])
    for r in idle_rows:
        print(f"{r['series']:<34} {r['idle_cpu_pct']:.3f} % of a core "
              f"({r['cpu_s']:.3f} CPU s in {r['idle_s']:.1f} s)", flush=True)  # fmt: skip

    targets = compute_targets(rows, lat_rows, ab_rows, idle_rows, ceiling, memcpy)
    print("--- targets")
    for t in targets:
        print(
            f"{t['target']:<55} measured {fmt(t['measured'])}  "
            f"{'met' if t['met'] else 'NOT MET' if t['met'] is False else 'not measured'}"
        )
    bad = [r["series"] for r in rows + lat_rows + ab_rows if not r.get("verified")]
    print("verification:", "all rows verified" if not bad else f"FAILED: {bad}")
    elapsed = time.perf_counter() - t_start
    print(f"elapsed {elapsed:.0f} s")

    if args.json:
        extra = {
            "machine_note": (
                f"{os.cpu_count()}-core VM; writer, receiver and baselines share its cores"
            ),
            "note": args.note,
            "quick": args.quick,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
            "busy_processes_start": busy0,
            "busy_processes_end": busy_processes(),
            "elapsed_s": elapsed,
            "plan": {k: v for k, v in cfg.items()},
            "method": (
                "two processes, one engine each, 1 domain, loopback; throughput = bytes / "
                "(first post .. all futures resolved and all immediates counted), window of "
                "writes in flight = max(2, min(64, 64 MiB / size)); latency = post .. future "
                "resolved of one 4 KiB write without immediate; plain-vs-imm timed post .. all "
                "futures delivered; idle = CPU s of the process (getrusage) / wall s"
            ),
            "engine_stats": stats,
        }
        out = {
            "meta": benchmeta.meta(extra),
            "rows": rows + ab_rows + lat_rows + idle_rows,
            "baselines": baselines,
            "targets": targets,
        }
        benchmeta.write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0 if not bad else 1


def busy_processes(min_pct: float = 5.0) -> List[str]:
    """Other processes using CPU (ps: lifetime %CPU), to read the numbers against."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,comm", "--sort=-pcpu"],
                             capture_output=True, text=True, timeout=5).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[3] != "ps" and float(parts[1]) >= min_pct:
            rows.append(" ".join(parts))
    return rows[:8]


def fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}"


def compute_targets(rows, lat_rows, ab_rows, idle_rows, ceiling, memcpy) -> List[Dict[str, Any]]:
    def find(rs, **kw):
        return next((r for r in rs if all(r.get(k) == v for k, v in kw.items())), None)

    def judge(name: str, measured: Optional[float], bound: float, ge: bool, **more: Any):
        met = None if measured is None else (measured >= bound if ge else measured <= bound)
        return {"target": name, "bound": bound, "sense": ">=" if ge else "<=",
                "measured": measured, "met": met, **more}  # fmt: skip

    out = []
    r = find(rows, provider="tcp;ofi_rxm", completion="delivered", size_bytes=64 * MiB)
    v = r["gbit_per_s"]["median"] / ceiling if r and ceiling else None
    out.append(
        judge(
            "tcp delivered 64 MiB / iperf3 ceiling",
            v,
            TARGETS["tcp_vs_iperf3"],
            True,
            gbit_per_s=r and r["gbit_per_s"]["median"],
            ceiling_gbit_per_s=ceiling,
        )
    )
    r = find(rows, provider="shm", completion="delivered", size_bytes=64 * MiB)
    m = memcpy.get(64 * MiB)
    v = r["gbit_per_s"]["median"] / m if r and m else None
    out.append(
        judge(
            "shm delivered 64 MiB / memcpy 64 MiB",
            v,
            TARGETS["shm_vs_memcpy"],
            True,
            gbit_per_s=r and r["gbit_per_s"]["median"],
            memcpy_gbit_per_s=m,
        )
    )
    r = find(lat_rows, provider="tcp;ofi_rxm", completion="delivered")
    v = r["latency_us"]["median"] if r else None
    out.append(
        judge(
            "tcp delivered 4 KiB latency p50, us",
            v,
            TARGETS["tcp_4k_p50_us"],
            False,
            p99_us=r and r["latency_us"]["p99"],
        )
    )
    for r in ab_rows:
        if "fraction_of_with_imm" in r:
            out.append(
                judge(
                    f"plain / with imm, tcp delivered {benchmeta_size(r['size_bytes'])}",
                    r["fraction_of_with_imm"],
                    TARGETS["plain_vs_imm"],
                    True,
                )
            )
    for r in idle_rows:
        out.append(
            judge(f"{r['series']}, % of a core", r["idle_cpu_pct"], TARGETS["idle_cpu_pct"], False)
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
