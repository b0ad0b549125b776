#!/usr/bin/env python3
"""Multi-NIC aggregation, fault tolerance and soak across network namespaces.

Two namespaces, "node A" and "node B", joined by N veth pairs (scripts/netns_testbed.py); one
engine agent (`python -m stolon.agent`) in each, with one domain per veth, so a domain group of N
domains spans N independent links. Needs root.

    python benchmarks/multinic.py bench --links 1,2,3,4 --rate 1000 --json out.json
    python benchmarks/multinic.py soak --links 4 --duration 600

The functions here are also used by tests/test_multinic.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import netns_testbed  # noqa: E402

MiB = 1 << 20


class AgentError(RuntimeError):
    def __init__(self, reply: Dict[str, Any]):
        super().__init__(f"{reply.get('error')}: {reply.get('message')}")
        self.reply = reply


class Agent:
    """A `stolon.agent` process inside one namespace of the testbed."""

    def __init__(self, tb, side: str, nodes: List[str], regions: List[int], **engine: Any):
        self.workdir = tempfile.mkdtemp(prefix="stolon-agent-", dir="/dev/shm")
        cfg = {
            "provider": "tcp",
            "nodes": nodes,
            "regions": regions,
            "workdir": self.workdir,
            "engine": engine,
        }
        argv = [sys.executable, "-m", "stolon.agent", json.dumps(cfg)]
        run = tb.exec_a if side == "a" else tb.exec_b
        self.proc = run(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = self._read(60)
        if not hello.get("ok"):
            raise AgentError(hello)
        self.address = hello["address"]
        self.descriptors = hello["descriptors"]
        self.files = hello["files"]

    def _read(self, timeout: float) -> Dict[str, Any]:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError("agent did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError("agent exited")
        return json.loads(line)

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 120.0) -> Dict[str, Any]:
        out = self._read(timeout)
        if not out.get("ok"):
            raise AgentError(out)
        return out

    def call(self, timeout: float = 120.0, **cmd: Any) -> Dict[str, Any]:
        self.send(**cmd)
        return self.reply(timeout)

    def view(self, region: int = 0) -> np.ndarray:
        """The agent's region, mapped read-only here."""
        return np.memmap(self.files[region], dtype=np.uint8, mode="r")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="exit", timeout=20)
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        try:
            os.rmdir(self.workdir)
        except OSError:
            pass


def pair(tb, regions_a: List[int], regions_b: List[int], **engine: Any):
    nodes_a = [ln.ip_a for ln in tb.links]
    nodes_b = [ln.ip_b for ln in tb.links]
    b = Agent(tb, "b", nodes_b, regions_b, **engine)
    a = Agent(tb, "a", nodes_a, regions_a, **engine)
    return a, b


def total_imms(results: List[Dict[str, Any]]) -> int:
    return sum(sum(r.get("imm_counts", [])) for r in results)


def timed_batch(
    a: Agent, b: Agent, ops: List[Dict[str, Any]], repeat: int, imm: int, window: int = 4
) -> Dict[str, Any]:
    """Runs a batch from A and confirms every immediate at B; returns bytes/s from the start
    to the receiver's confirmation."""
    t0 = time.time()
    res = a.call(cmd="batch", ops=ops, repeat=repeat, window=window, timeout=120)
    errors = [r for r in res["results"] if "error" in r]
    if errors:
        raise AssertionError(f"batch errors: {errors}")
    n = total_imms(res["results"]) * repeat
    w = b.call(cmd="wait_imms", imms={str(imm): n}, timeout=120)
    assert w["left"] == {str(imm): 0}, w
    return {"seconds": w["t_end"] - t0, "imms": n}


def workload(kind: str, size: int, desc: List[str], imm: int) -> List[Dict[str, Any]]:
    if kind == "single":
        return [{"kind": "single", "src": 0, "dst": desc[0], "dst_off": 0, "len": size, "imm": imm}]
    if kind == "paged":
        page = 256 << 10
        n = size // page
        return [
            {
                "kind": "paged",
                "dst": desc[0],
                "page": page,
                "src_pages": list(range(n)),
                "dst_pages": list(range(n))[::-1],
                "imm": imm,
            }
        ]
    if kind == "scatter":
        part = size // len(desc)
        items = [[d, i * part, 0, part] for i, d in enumerate(desc)]
        return [{"kind": "scatter", "items": items, "imm": imm}]
    raise ValueError(kind)


def bench(
    links: List[int], rate: float, kinds: List[str], size: int, seconds: float
) -> List[Dict[str, Any]]:
    rows = []
    for n in links:
        with netns_testbed.Testbed(n, rates_mbit=[rate] * n) as tb:
            # B: one region for single and paged writes, four for the scatter's destinations.
            a, b = pair(tb, [size], [size] + [size // 4] * 4)
            try:
                a.call(cmd="fill", seed=1)
                for kind in kinds:
                    descs = b.descriptors[1:] if kind == "scatter" else b.descriptors[:1]
                    ops = workload(kind, size, descs, 7)
                    capacity = n * rate * 1e6 / 8  # bytes/s
                    repeat = max(2, int(capacity * seconds / size))
                    r = timed_batch(a, b, ops, repeat, 7)
                    gbps = size * repeat * 8 / r["seconds"] / 1e9
                    row = {
                        "op": kind,
                        "links": n,
                        "cap_mbit_per_link": rate,
                        "size_bytes": size,
                        "repeat": repeat,
                        "gbit_per_s": gbps,
                        "fraction_of_n_x_cap": gbps * 1e3 / (n * rate),
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                a.close()
                b.close()
    return rows


def random_ops(rng: random.Random, size: int, desc: str, stripes: int, imm: int):
    """Random ops into disjoint stripes of the destination; returns (ops, expected writes)."""
    stripe = size // stripes
    ops, writes = [], []
    for k in range(stripes):
        base = k * stripe
        kind = rng.choice(["single", "single", "paged", "scatter"])
        if kind == "single":
            ln = rng.choice([0, 1, 64, 4096, rng.randrange(1, stripe)])
            s = rng.randrange(0, size - ln + 1)
            ops.append(
                {"kind": "single", "src": s, "dst": desc, "dst_off": base, "len": ln, "imm": imm}
            )
            writes.append((s, base, ln))
        elif kind == "paged":
            page = rng.choice([4096, 65536])
            per = max(1, stripe // page)
            dp = rng.sample(range(per), min(per, rng.randint(1, 8)))
            sp = [rng.randrange(0, size // page) for _ in dp]
            ops.append(
                {
                    "kind": "paged",
                    "dst": desc,
                    "page": page,
                    "src_pages": sp,
                    "dst_pages": dp,
                    "dst_offset": base,
                    "imm": imm,
                }
            )
            writes += [(a * page, base + b * page, page) for a, b in zip(sp, dp)]
        else:
            slot = stripe // 4
            items = []
            for j in range(4):
                ln = rng.randrange(0, slot)
                s = rng.randrange(0, size - ln + 1)
                items.append([desc, s, base + j * slot, ln])
                writes.append((s, base + j * slot, ln))
            ops.append({"kind": "scatter", "items": items, "imm": imm})
    return ops, writes


def soak(
    links: int,
    rates: Optional[List[float]],
    duration: float,
    size: int = 32 * MiB,
    seed: int = 0,
    log=print,
) -> Dict[str, Any]:
    """Random transfers across `links` links for `duration` seconds; every batch is checked
    byte for byte and immediate for immediate."""
    rng = random.Random(seed)
    stats = {
        "batches": 0,
        "ops": 0,
        "bytes": 0,
        "errors": 0,
        "corrupt_batches": 0,
        "imm_mismatches": 0,
    }
    with netns_testbed.Testbed(links, rates_mbit=rates) as tb:
        a, b = pair(tb, [size], [size], timeout=30.0)
        try:
            a.call(cmd="fill", seed=seed + 1)
            src = np.random.default_rng(seed + 1).integers(0, 256, size, np.uint8)
            image = np.zeros(size, dtype=np.uint8)
            dst = b.view()
            t_end = time.time() + duration
            while time.time() < t_end:
                imm = 100 + stats["batches"] % 1000
                ops, writes = random_ops(rng, size, b.descriptors[0], 16, imm)
                res = a.call(cmd="batch", ops=ops, timeout=60)
                errs = [r for r in res["results"] if "error" in r]
                stats["errors"] += len(errs)
                if errs:
                    log(f"transfer errors: {errs[:3]}")
                    continue
                n = total_imms(res["results"])
                w = b.call(cmd="wait_imms", imms={str(imm): n}, timeout=60)
                if w["left"] != {str(imm): 0}:
                    stats["imm_mismatches"] += 1
                for s, d, ln in writes:
                    image[d : d + ln] = src[s : s + ln]
                if not np.array_equal(dst, image):
                    stats["corrupt_batches"] += 1
                    bad = int(np.nonzero(dst != image)[0][0])
                    log(f"CORRUPTION in batch {stats['batches']}: first bad byte {bad}")
                    image[:] = dst  # resynchronise so later batches are judged on their own
                stats["batches"] += 1
                stats["ops"] += len(ops)
                stats["bytes"] += sum(w[2] for w in writes)
            stats["seconds"] = duration
            stats["link_stats"] = a.call(cmd="stats")["stats"]
        finally:
            a.close()
            b.close()
    return stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pb = sub.add_parser("bench", help="aggregation over N capped links")
    pb.add_argument("--links", default="1,2,3,4")
    pb.add_argument("--rate", type=float, default=1000.0, help="cap per link, Mbit/s")
    pb.add_argument("--ops", default="single,paged,scatter")
    pb.add_argument("--size", type=int, default=64 * MiB)
    pb.add_argument("--seconds", type=float, default=4.0, help="target seconds per row")
    pb.add_argument("--json")
    ps = sub.add_parser("soak", help="random transfers across links, checked")
    ps.add_argument("--links", type=int, default=4)
    ps.add_argument("--rate", default="", help="comma list of caps (Mbit/s); empty: uncapped")
    ps.add_argument("--duration", type=float, default=600.0)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--json")
    args = p.parse_args()
    ok, why = netns_testbed.available()
    if not ok:
        print(f"cannot build the testbed: {why}", file=sys.stderr)
        return 2
    if args.cmd == "bench":
        rows = bench(
            [int(x) for x in args.links.split(",")],
            args.rate,
            args.ops.split(","),
            args.size,
            args.seconds,
        )
        print("\nop       links  cap/link  Gbit/s   of N x cap")
        for r in rows:
            print(
                f"{r['op']:<8} {r['links']:>5} {r['cap_mbit_per_link']:>8.0f} "
                f"{r['gbit_per_s']:>8.3f}  {r['fraction_of_n_x_cap']:>8.3f}"
            )
        if args.json:
            meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    rates = [float(x) for x in args.rate.split(",")] if args.rate else None
    out = soak(args.links, rates, args.duration, seed=args.seed)
    print(json.dumps({k: v for k, v in out.items() if k != "link_stats"}, indent=2))
    for i, s in enumerate(out["link_stats"]):
        print(f"link {i}: {s['bytes_written']} bytes, {s['write_ops']} ops, {s['errors']} errors")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    bad = out["corrupt_batches"] or out["imm_mismatches"] or out["errors"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
