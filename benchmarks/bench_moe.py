"""MoE dispatch/combine latency: stolon's kernels against NCCL, and the NVLink byte floor.

    python3 benchmarks/bench_moe.py --json moe.json            # every visible GPU (2 or 4)
    python3 benchmarks/bench_moe.py --gpus 2 --configs decode --quick
    python3 benchmarks/bench_moe.py --gpus 2 --ranks-per-node 1 --via staged --no-nccl

One process per GPU, torch.distributed with NCCL. For each configuration (decode: 128 tokens
per rank; prefill: 4096; both hidden 7168, 256 experts, top-8, fp8 dispatch with 56 float32
scales per token, bf16 combine), every iteration draws a fresh routing and measures with CUDA
events, per rank:

- stolon: dispatch_send, dispatch_recv, combine_send, combine_recv (the halves), and
  dispatch = send + recv, combine = send + recv (an event between the halves);
  dispatch_whole and combine_whole = `dispatch(overlap=False)` and `combine(overlap=False)`
  each timed as one span; dispatch_overlapped and combine_overlapped = the overlapped forms
  (`overlap=True`, all ranks on one node). All three forms run in the same iterations.
  Each iteration is queued behind a GPU sleep and a one-element all_reduce, so the GPUs
  start together and the events time the GPU, not Python (the same for the NCCL graph form).
- NCCL eager: pack each token once per destination rank (with its routing), exchange counts
  with all_to_all_single, read them on the host, exchange tokens with all_to_all_single; the
  combine sends the partial sums back and adds them per token. It omits the receiver's grouping
  by expert, so it is a lower bound on a full implementation.
- NCCL graph: fixed-size padded buffers (every token to every rank), all_to_all_single
  captured in a CUDA graph; the strongest fair form.
- floor: bytes each GPU must receive from other GPUs (a token once per destination rank) over
  the in-process peer-copy bandwidth measured in the same run.

Latencies are the median and p99 over iterations and ranks. Prints a table; `--json` writes
every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = {
    "decode": dict(tokens=128, hidden=7168, experts=256, topk=8, iters=300, warmup=30),
    "prefill": dict(tokens=4096, hidden=7168, experts=256, topk=8, iters=40, warmup=5),
    # Not one of the configurations: between the two, to find where the overlapped
    # dispatch starts to pay (`--configs mid`).
    "mid": dict(tokens=1024, hidden=7168, experts=256, topk=8, iters=100, warmup=10),
}


def pct(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def routing(g: torch.Generator, n: int, experts: int, topk: int, dev) -> tuple:
    scores = torch.rand((n, experts), generator=g, device=dev)
    w, idx = scores.topk(topk, dim=1)
    return idx, (w / w.sum(dim=1, keepdim=True)).float().contiguous()


def peer_copy_gbps(size: int = 256 << 20, reps: int = 10) -> float:
    a = torch.empty(size, dtype=torch.uint8, device="cuda:0")
    b = torch.empty(size, dtype=torch.uint8, device="cuda:1")
    for _ in range(2):
        b.copy_(a)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    return size * reps / (time.perf_counter() - t) / 1e9


def start_together(event, tiny: torch.Tensor) -> None:
    """Queues ~1 ms of GPU sleep (the CPU queues the whole iteration meanwhile, so the events
    time the GPU, not Python), then a one-element all_reduce that the GPUs leave together,
    then the start event."""
    torch.cuda._sleep(2_000_000)
    dist.all_reduce(tiny)
    event.record()


def bench_stolon(cfg, rank, world, dev, routes, x, xs, y) -> Dict[str, Any]:
    from stolon.moe import AllToAll

    kw: Dict[str, Any] = {}
    if cfg.get("ranks_per_node"):  # emulated nodes: the proxy and an engine between them
        import gpu_roles

        kw = {
            "ranks_per_node": cfg["ranks_per_node"],
            "engine": gpu_roles.engine(rank, nvlink=cfg["via"] == "nvlink"),
        }
    a2a = AllToAll(
        num_experts=cfg["experts"],
        topk=cfg["topk"],
        hidden=cfg["hidden"],
        max_tokens=cfg["tokens"],
        dispatch_dtype=torch.float8_e4m3fn,
        combine_dtype=torch.bfloat16,
        device=dev,
        **kw,
    )
    from stolon.moe import DispatchOutput

    out = DispatchOutput(
        x=torch.empty((a2a.capacity, cfg["hidden"]), dtype=torch.float8_e4m3fn, device=dev),
        scales=torch.empty((a2a.capacity, a2a.scales_per_token), device=dev),
        counts=torch.empty(a2a.experts_per_rank, dtype=torch.int32, device=dev),
        offsets=torch.empty(a2a.experts_per_rank + 1, dtype=torch.int32, device=dev),
    )
    yy = y[: a2a.capacity]
    res = torch.empty((cfg["tokens"], cfg["hidden"]), dtype=torch.bfloat16, device=dev)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
    tiny = torch.zeros(1, device=dev)
    names = ["dispatch_send", "dispatch_recv", "combine_send", "combine_recv"]
    samples: Dict[str, List[float]] = {
        k: [] for k in names + ["dispatch", "combine", "dispatch_whole", "combine_whole"]
    }
    # The overlapped whole dispatch and combine (every rank on one node only), timed in the
    # same iterations.
    overlap = not cfg.get("ranks_per_node")
    if overlap:
        samples["dispatch_overlapped"] = []
        samples["combine_overlapped"] = []
    prof = None
    for it in range(cfg["warmup"] + cfg["iters"]):
        if it == cfg["warmup"] and cfg.get("profile"):
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        idx, w = routes[it % len(routes)]
        torch.cuda.synchronize()
        dist.barrier()
        start_together(ev[0], tiny)
        a2a.dispatch_send(x, idx, w, xs)
        ev[1].record()
        a2a.dispatch_recv(out)
        ev[2].record()
        a2a.combine_send(yy)
        ev[3].record()
        a2a.combine_recv(res)
        ev[4].record()
        a2a.synchronize()
        if it >= cfg["warmup"]:
            t = [ev[i].elapsed_time(ev[i + 1]) * 1000 for i in range(4)]
            for k, v in zip(names, t):
                samples[k].append(v)
            samples["dispatch"].append(t[0] + t[1])
            samples["combine"].append(t[2] + t[3])
        # The whole dispatch and combine, each timed as one span (no event between the
        # halves): what a caller of dispatch() / combine() waits for; split, then overlapped.
        forms = [("dispatch_whole", False)] + ([("dispatch_overlapped", True)] if overlap else [])
        for key, ov in forms:
            torch.cuda.synchronize()
            dist.barrier()
            start_together(ev[0], tiny)
            a2a.dispatch(x, idx, w, xs, out=out, overlap=ov)
            ev[1].record()
            a2a.combine(yy, out=res, overlap=ov)
            ev[2].record()
            a2a.synchronize()
            if it >= cfg["warmup"]:
                samples[key].append(ev[0].elapsed_time(ev[1]) * 1000)
                ckey = "combine_overlapped" if ov else "combine_whole"
                samples[ckey].append(ev[1].elapsed_time(ev[2]) * 1000)
    kernels = {}
    if prof is not None:
        torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        kernels = kernel_times(prof)
    fp = a2a.footprint()
    torch.cuda.synchronize()
    dist.barrier()
    a2a.close()
    return {"samples": samples, "footprint": fp, "kernels": kernels}


def kernel_times(prof) -> Dict[str, float]:
    """Mean GPU time (us) of each stolon kernel the profiler saw (CUPTI activity records: the
    kernel's own run time, without launch gaps or waits before it started)."""
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("moe_") and e.count:
            total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            out[e.key] = total / e.count
    return out


def _pack_rows(x, xs, idx, w) -> torch.Tensor:
    """Each token's bytes with its scales and routing: what a rank sends per destination."""
    n = x.shape[0]
    return torch.cat(
        [
            x.view(torch.uint8),
            xs.view(torch.uint8).reshape(n, -1),
            idx.to(torch.int32).view(torch.uint8).reshape(n, -1),
            w.view(torch.uint8).reshape(n, -1),
        ],
        dim=1,
    )


def bench_nccl_eager(cfg, rank, world, dev, routes, x, xs, y) -> Dict[str, Any]:
    epr = cfg["experts"] // world
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    samples: Dict[str, List[float]] = {"dispatch": [], "combine": []}
    H = cfg["hidden"]
    for it in range(cfg["warmup"] + cfg["iters"]):
        idx, w = routes[it % len(routes)]
        torch.cuda.synchronize()
        dist.barrier()
        ev[0].record()
        mask = torch.zeros((x.shape[0], world), dtype=torch.bool, device=dev)
        mask.scatter_(1, idx // epr, True)
        send_counts = mask.sum(0)
        tok = mask.t().nonzero()[:, 1]  # tokens ordered by destination rank
        send = _pack_rows(x, xs, idx, w)[tok]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        recv = torch.empty((sum(rc), send.shape[1]), dtype=torch.uint8, device=dev)
        dist.all_to_all_single(recv, send, rc, sc)
        ev[1].record()
        # Combine: one partial sum per received token goes back; the sender adds them up.
        back = torch.empty((sum(sc), H), dtype=torch.bfloat16, device=dev)
        dist.all_to_all_single(back, y[: sum(rc)], sc, rc)
        out = torch.zeros((x.shape[0], H), dtype=torch.float32, device=dev)
        out.index_add_(0, tok, back.float())
        out = out.to(torch.bfloat16)
        ev[2].record()
        torch.cuda.synchronize()
        if it >= cfg["warmup"]:
            samples["dispatch"].append(ev[0].elapsed_time(ev[1]) * 1000)
            samples["combine"].append(ev[1].elapsed_time(ev[2]) * 1000)
    return {"samples": samples}


def bench_nccl_graph(cfg, rank, world, dev, routes, x, xs, y) -> Dict[str, Any]:
    T, H = cfg["tokens"], cfg["hidden"]
    epr = cfg["experts"] // world
    idx0, w0 = routes[0]
    s_idx, s_w = idx0.clone(), w0.clone()
    row = _pack_rows(x, xs, s_idx, s_w).shape[1]
    send = torch.empty((world, T, row), dtype=torch.uint8, device=dev)
    recv = torch.empty_like(send)
    ysend = y[: world * T].view(world, T, H)
    yrecv = torch.empty_like(ysend)
    out = torch.empty((T, H), dtype=torch.bfloat16, device=dev)

    def dispatch() -> None:
        send.copy_(_pack_rows(x, xs, s_idx, s_w).unsqueeze(0).expand(world, T, row))
        dist.all_to_all_single(recv.view(-1), send.view(-1))

    def combine() -> None:
        dist.all_to_all_single(yrecv.view(-1), ysend.reshape(-1))
        mask = torch.zeros((T, world), dtype=torch.bool, device=dev)
        mask.scatter_(1, s_idx // epr, True)
        out.copy_((yrecv.float() * mask.t().unsqueeze(2)).sum(0))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            dispatch()
            combine()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    gd, gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(gd):
        dispatch()
    with torch.cuda.graph(gc):
        combine()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    tiny = torch.zeros(1, device=dev)
    samples: Dict[str, List[float]] = {"dispatch": [], "combine": []}
    for it in range(cfg["warmup"] + cfg["iters"]):
        idx, w = routes[it % len(routes)]
        s_idx.copy_(idx)
        s_w.copy_(w)
        torch.cuda.synchronize()
        dist.barrier()
        start_together(ev[0], tiny)
        gd.replay()
        ev[1].record()
        gc.replay()
        ev[2].record()
        torch.cuda.synchronize()
        if it >= cfg["warmup"]:
            samples["dispatch"].append(ev[0].elapsed_time(ev[1]) * 1000)
            samples["combine"].append(ev[1].elapsed_time(ev[2]) * 1000)
    return {"samples": samples, "padded_bytes_per_rank": (world - 1) * T * row}


def remote_bytes(cfg, world, rank, routes_all, token_bytes: int) -> float:
    """Mean over iterations of the bytes `rank` receives from other ranks (token once per rank)."""
    epr = cfg["experts"] // world
    total = []
    for per_rank in routes_all:
        n = 0
        for src, idx in enumerate(per_rank):
            if src == rank:
                continue
            n += int(((idx // epr) == rank).any(dim=1).sum())
        total.append(n * token_bytes)
    return sum(total) / len(total)


def worker(rank: int, world: int, args: argparse.Namespace, init: str, q) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{init}", rank=rank, world_size=world, device_id=dev
    )
    from stolon.moe import quantize_fp8

    results: Dict[str, Any] = {}
    if rank == 0 and world >= 2:
        results["peer_copy_gbps"] = peer_copy_gbps()
    dist.barrier()
    for name in args.configs.split(","):
        cfg = dict(CONFIGS[name])
        if args.ranks_per_node:
            cfg.update(ranks_per_node=args.ranks_per_node, via=args.via)
        if args.quick:
            cfg["iters"], cfg["warmup"] = max(10, cfg["iters"] // 10), 3
        cfg["profile"] = args.profile
        T, H, E, K = cfg["tokens"], cfg["hidden"], cfg["experts"], cfg["topk"]
        g = torch.Generator(device=dev).manual_seed(1234 + rank)
        x, xs = quantize_fp8(torch.randn((T, H), generator=g, device=dev))
        nroutes = 16
        routes = [routing(g, T, E, K, dev) for _ in range(nroutes)]
        y = torch.randn((world * T * min(K, E // world), H), generator=g, device=dev).to(
            torch.bfloat16
        )
        out: Dict[str, Any] = {"config": cfg}
        forms = [("stolon", bench_stolon)]
        if not args.no_nccl:
            forms += [("nccl_eager", bench_nccl_eager), ("nccl_graph", bench_nccl_graph)]
        for label, fn in forms:
            try:
                out[label] = fn(cfg, rank, world, dev, routes, x, xs, y)
            except Exception as e:  # reported, the other forms still run
                out[label] = {"error": f"{type(e).__name__}: {e}"}
                print(f"rank {rank} {name} {label}: {e}", file=sys.stderr, flush=True)
        # Every rank's routings, to count the bytes each rank must receive.
        gathered: List[Any] = [None] * world
        dist.all_gather_object(gathered, [r[0].cpu() for r in routes])
        routes_all = [[gathered[s][i] for s in range(world)] for i in range(nroutes)]
        d_bytes = H + 4 * (H // 128)
        out["floor_bytes"] = {
            "dispatch": remote_bytes(cfg, world, rank, routes_all, d_bytes),
            "combine": remote_bytes(cfg, world, rank, routes_all, 2 * H),
        }
        results[name] = out
        dist.barrier()
    all_res: List[Any] = [None] * world
    dist.all_gather_object(all_res, results)
    if rank == 0:
        q.put(all_res)
    dist.barrier()
    dist.destroy_process_group()


def summarize(all_res: List[Dict[str, Any]], configs: List[str], world: int) -> Dict[str, Any]:
    bw = all_res[0].get("peer_copy_gbps")
    summary: Dict[str, Any] = {"world": world, "peer_copy_gbps": bw, "configs": {}}
    for name in configs:
        cfg_out: Dict[str, Any] = {"config": all_res[0][name]["config"]}
        for label in ("stolon", "nccl_eager", "nccl_graph"):
            if label not in all_res[0][name]:
                continue
            per = [r[name][label] for r in all_res]
            errs = [p["error"] for p in per if "error" in p]
            if errs:
                cfg_out[label] = {"error": errs[0]}
                continue
            stats = {}
            for k in per[0]["samples"]:
                xs = [v for p in per for v in p["samples"][k]]
                stats[k] = {"median_us": statistics.median(xs), "p99_us": pct(xs, 0.99)}
            cfg_out[label] = stats
            if label == "stolon":
                cfg_out["footprint"] = per[0]["footprint"]
                names = sorted({k for p in per for k in p.get("kernels", {})})
                if names:
                    cfg_out["kernel_us"] = {
                        k: statistics.mean(p["kernels"][k] for p in per if k in p["kernels"])
                        for k in names
                    }
        fb = [r[name]["floor_bytes"] for r in all_res]
        cfg_out["bytes_received_per_rank"] = {
            k: max(f[k] for f in fb) for k in ("dispatch", "combine")
        }
        if bw:
            cfg_out["floor_us"] = {
                k: v / (bw * 1e9) * 1e6 for k, v in cfg_out["bytes_received_per_rank"].items()
            }
        summary["configs"][name] = cfg_out
    return summary


def print_table(s: Dict[str, Any]) -> None:
    print(f"\nMoE all-to-all, {s['world']} GPUs; peer copy {s['peer_copy_gbps'] or 0:.0f} GB/s")
    for name, c in s["configs"].items():
        cfg = c["config"]
        print(
            f"\n{name}: {cfg['tokens']} tokens/rank, hidden {cfg['hidden']}, {cfg['experts']} "
            f"experts, top-{cfg['topk']}, fp8 dispatch, bf16 combine ({cfg['iters']} iterations)"
        )
        print(f"{'':34s} {'median us':>10s} {'p99 us':>10s}")
        for label in ("stolon", "nccl_eager", "nccl_graph"):
            st = c.get(label, {})
            if "error" in st:
                print(f"{label:34s} error: {st['error']}")
                continue
            for k, v in st.items():
                print(f"{label + ' ' + k:34s} {v['median_us']:10.1f} {v['p99_us']:10.1f}")
        for k, v in c.get("floor_us", {}).items():
            mb = c["bytes_received_per_rank"][k] / 1e6
            print(f"{'NVLink floor ' + k:34s} {v:10.1f}   ({mb:.2f} MB received per rank)")
        for k, v in c.get("kernel_us", {}).items():
            print(f"{'kernel ' + k:34s} {v:10.1f}   (mean GPU time, profiler)")
        if "footprint" in c:
            f = c["footprint"]
            print(
                f"stolon buffers: {f['footprint_bytes'] / 2**20:.1f} MiB receive area + state, "
                f"dispatch output {f['dispatch_output_bytes'] / 2**20:.1f} MiB"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=0, help="GPUs (default: all visible, at most 8)")
    ap.add_argument("--configs", default="decode,prefill")
    ap.add_argument("--quick", action="store_true", help="a tenth of the iterations")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument(
        "--ranks-per-node",
        type=int,
        default=0,
        help="group the ranks into emulated nodes of this many: traffic between them goes "
        "through the host proxy and an engine (see --via)",
    )
    ap.add_argument("--via", choices=["nvlink", "staged"], default="nvlink",
                    help="the engine path between emulated nodes")  # fmt: skip
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also report each stolon kernel's mean GPU time (torch profiler, CUPTI)",
    )
    ap.add_argument(
        "--no-nccl",
        action="store_true",
        help="stolon and the floor only (for sweeps; published tables keep NCCL)",
    )
    args = ap.parse_args()
    world = args.gpus or min(torch.cuda.device_count(), 8)
    if world < 2:
        sys.exit("needs at least 2 GPUs")
    init = os.path.join(tempfile.mkdtemp(prefix="stolon-moe-bench-"), "init")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, args, init, q)) for r in range(world)]
    for p in procs:
        p.start()
    all_res = q.get(timeout=1800)
    for p in procs:
        p.join(60)
    summary = summarize(all_res, args.configs.split(","), world)
    summary["device"] = torch.cuda.get_device_name(0)
    summary["date"] = time.strftime("%Y-%m-%d")
    summary["command"] = " ".join(sys.argv)
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
