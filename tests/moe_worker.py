"""Worker side of the MoE GPU tests: one process per rank, driven by tests/procpool.py.

Every rank regenerates every rank's inputs from the case's seed (on the CPU, so all ranks agree
bit for bit), runs the all-to-all on its GPU, and checks its own outputs against the plain torch
reference in stolon.moe.reference. Handles are exchanged through files in a directory the test
gives, so a case may use any subset of the workers.
"""

from __future__ import annotations

import collections
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from stolon.moe import AllToAll, dequantize_fp8, expected_rows, moe_reference, quantize_fp8

# Every worker builds all ranks' inputs and the reference on the CPU, one process per GPU:
# torch's default of one thread per core in each would oversubscribe the host (4 workers on a
# 64-core machine would run 256 threads on small tensors).
torch.set_num_threads(max(1, min(8, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()))))

DTYPES = {
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "f32": torch.float32,
    "fp8": torch.float8_e4m3fn,
}
#: Leading columns of every token that encode (source rank, token index) in base-8 digits,
#: exact in every dispatch dtype (fp8 e4m3 holds integers up to 16 exactly).
ID_COLS = 5


def file_exchange(directory: str, rank: int, world: int, timeout: float = 60.0) -> Callable:
    """An `exchange=` for AllToAll: handles meet as files in `directory`, one file name per
    call (the second call, from close, is a barrier)."""
    calls = [0]

    def exchange(mine: bytes) -> List[bytes]:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        n = calls[0]
        calls[0] += 1
        tmp = d / f".{n}-{rank}.tmp"
        tmp.write_bytes(mine)
        os.replace(tmp, d / f"{n}-{rank}")
        deadline = time.monotonic() + timeout
        out: List[bytes] = []
        for r in range(world):
            p = d / f"{n}-{r}"
            while not p.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {r}'s handle did not appear in {directory}")
                time.sleep(0.005)
            out.append(p.read_bytes())
        return out

    return exchange


def device_of(rank: int) -> int:
    """The GPU of `rank`: rank r on cuda:r (one rank per GPU; the tests never run more ranks
    than GPUs)."""
    return rank % torch.cuda.device_count()


def expert_scale(e: int) -> float:
    """The test experts multiply their input by a per-expert constant."""
    return 1.0 + (e % 7) / 8.0


def make_routing(case: Dict[str, Any], rank: int, n: int, g: torch.Generator) -> torch.Tensor:
    """[n, topk] expert ids for one rank, by the case's routing mode."""
    e, k, world = case["experts"], case["topk"], case["world"]
    mode = case["route"]
    if n == 0:
        return torch.empty((0, k), dtype=torch.int64)
    if mode == "random":
        return torch.rand((n, e), generator=g).topk(k, dim=1).indices
    if mode == "one_expert":  # every slot of every token names the same expert
        return torch.full((n, k), case["seed"] % e, dtype=torch.int64)
    if mode == "one_rank":  # only the experts of one rank (top-k of those, maybe repeated)
        epr = e // world
        target = case["seed"] % world
        pick = torch.randint(0, epr, (n, k), generator=g)
        return target * epr + pick
    if mode == "few_experts":  # most experts get nothing
        pool = torch.randperm(e, generator=g)[: max(1, min(e, k + 1))]
        return pool[torch.randint(0, pool.numel(), (n, k), generator=g)]
    raise ValueError(mode)


def make_inputs(case: Dict[str, Any]) -> List[Dict[str, torch.Tensor]]:
    """Every rank's tokens (with ID columns), scales, routing and weights, on the CPU."""
    g = torch.Generator().manual_seed(case["seed"])
    dt = DTYPES[case["dispatch"]]
    out = []
    for r in range(case["world"]):
        n = case["tokens"][r]
        xf = torch.randn((n, case["hidden"]), generator=g)
        t = torch.arange(n)
        digits = torch.stack(
            [torch.full_like(t, r), t // 512, (t // 64) % 8, (t // 8) % 8, t % 8], 1
        )
        if dt == torch.float8_e4m3fn:
            q, s = quantize_fp8(xf)
            q[:, :ID_COLS] = digits.to(torch.float32).to(dt)
            x, scales = q, s
        else:
            xf[:, :ID_COLS] = digits.to(torch.float32)
            x, scales = xf.to(dt), None
        idx = make_routing(case, r, n, g)
        if case.get("idx32"):
            idx = idx.to(torch.int32)
        w = torch.rand((n, case["topk"]), generator=g)
        out.append({"x": x, "scales": scales, "idx": idx, "w": w})
    return out


def as_float(inp: Dict[str, torch.Tensor]) -> torch.Tensor:
    if inp["scales"] is not None:
        return dequantize_fp8(inp["x"], inp["scales"])
    return inp["x"].float()


def decode_ids(rows: torch.Tensor) -> torch.Tensor:
    """(src, token) of dispatched rows from their ID columns."""
    d = rows[:, :ID_COLS].float().round().long()
    return torch.stack([d[:, 0], d[:, 1] * 512 + d[:, 2] * 64 + d[:, 3] * 8 + d[:, 4]], 1)


def check_dispatch(case, rank, inputs, out) -> int:
    """Asserts `rank`'s dispatch output equals the reference; returns rows checked."""
    exp = expected_rows([i["idx"] for i in inputs], case["experts"], rank)
    counts = out.counts.cpu().tolist()
    offsets = out.offsets.cpu().tolist()
    assert counts == [e.count for e in exp], (counts, [e.count for e in exp])
    assert offsets[:-1] == [e.offset for e in exp], offsets
    assert offsets[-1] == sum(counts)
    x = out.x.cpu()
    scales = out.scales.cpu() if out.scales is not None else None
    all_x = torch.cat([i["x"] for i in inputs])
    all_s = torch.cat([i["scales"] for i in inputs]) if scales is not None else None
    base = torch.tensor([0] + [i["x"].shape[0] for i in inputs]).cumsum(0)
    for ex in exp:
        rows = x[ex.offset : ex.offset + ex.count]
        ids = decode_ids(rows)
        # Grouped by source rank, in rank order.
        srcs = ids[:, 0].tolist()
        assert srcs == sorted(srcs), f"expert {ex.expert}: sources out of order {srcs}"
        for s, want in enumerate(ex.by_source):
            got = collections.Counter(t for (src, t) in ids.tolist() if src == s)
            assert got == collections.Counter(t for (t, _k) in want), (ex.expert, s, got, want)
        # Every byte of every row (and its scales) equals the source token.
        if ex.count:
            flat = base[ids[:, 0]] + ids[:, 1]
            want = all_x[flat]
            assert torch.equal(rows.view(torch.uint8), want.view(torch.uint8)), ex.expert
            if scales is not None:
                assert torch.equal(scales[ex.offset : ex.offset + ex.count], all_s[flat])
    return sum(counts)


def expert_consts(a2a: AllToAll, rank: int) -> tuple:
    """Row numbers and per-local-expert constants on the device (made outside any graph)."""
    epr = a2a.experts_per_rank
    rows = torch.arange(a2a.capacity, dtype=torch.int32, device=a2a.device)
    c = torch.tensor([expert_scale(rank * epr + i) for i in range(epr)], device=a2a.device)
    return rows, c


def expert_outputs(a2a: AllToAll, out, consts: tuple) -> torch.Tensor:
    """y rows: each row's input (dequantised) times its expert's constant, in the combine dtype.
    Device-only work, so it can sit inside a CUDA graph."""
    rows, cvec = consts
    le = torch.searchsorted(out.offsets[1:], rows, right=True)
    c = cvec[le.clamp(max=a2a.experts_per_rank - 1)]
    xf = dequantize_fp8(out.x, out.scales) if out.scales is not None else out.x.float()
    return (xf * c.unsqueeze(1)).to(a2a.combine_dtype)


def check_combine(case, rank, inputs, result: torch.Tensor, base=None) -> float:
    """Asserts the combine equals the reference (plus `base`, what an accumulating combine
    added to) within the dtype's tolerance; returns the max error."""
    comb = DTYPES[case["combine"]]
    ref = moe_reference(
        [as_float(i) for i in inputs],
        [i["idx"].long() for i in inputs],
        [i["w"] for i in inputs],
        lambda e, rows: rows * expert_scale(e),
        torch.float32,
    )[rank]
    if base is not None:
        ref = ref + base.float().cpu()
    got = result.float().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[comb]
    scale = ref.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    err = ((got - ref).abs() / scale).max().item() if ref.numel() else 0.0
    assert err <= tol, f"combine differs from the reference by {err} (> {tol}) of the row max"
    return err


def _a2a(case, rank, exchange_dir, **kw) -> AllToAll:
    # Launch settings the all-to-all reads when it is built (blocks per SM, senders of the
    # overlapped dispatch).
    saved = {k: os.environ.get(k) for k in case.get("env", {})}
    os.environ.update({k: str(v) for k, v in case.get("env", {}).items()})
    try:
        return _build(case, rank, exchange_dir, **kw)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def overlap_of(case: Dict[str, Any], rank: int, step: int) -> Optional[bool]:
    """The `overlap` argument of `rank`'s dispatch and combine in `step`: the case's `overlap`
    (None, True, False), or "mixed": the ranks alternate between the two forms, and so do the
    steps."""
    o = case.get("overlap")
    if o == "mixed":
        return (rank + step) % 2 == 0
    return o


def _build(case, rank, exchange_dir, **kw) -> AllToAll:
    return AllToAll(
        num_experts=case["experts"],
        topk=case["topk"],
        hidden=case["hidden"],
        max_tokens=case["max_tokens"],
        dispatch_dtype=DTYPES[case["dispatch"]],
        combine_dtype=DTYPES[case["combine"]],
        rank=rank,
        world_size=case["world"],
        exchange=file_exchange(exchange_dir, rank, case["world"], case.get("timeout", 20.0) + 10),
        timeout=case.get("timeout", 20.0),
        device=torch.device("cuda", device_of(rank)),
        **kw,
    )


def _engine_kw(case: Dict[str, Any], rank: int) -> Dict[str, Any]:
    """With `ranks_per_node` in the case: an engine on this GPU for the ranks on other
    (emulated) nodes, over its NVLink domain or staged tcp (`via`)."""
    if not case.get("ranks_per_node"):
        return {}
    import gpu_roles

    eng = gpu_roles.engine(device_of(rank), nvlink=case.get("via", "nvlink") == "nvlink")
    return {"ranks_per_node": case["ranks_per_node"], "engine": eng}


def _cmd_case(state: dict, case: Dict[str, Any], rank: int, exchange_dir: str) -> Dict[str, Any]:
    """Runs `case["steps"]` steps with fresh inputs each; checks dispatch and combine."""
    torch.cuda.set_device(device_of(rank))
    a2a = _a2a(case, rank, exchange_dir, **_engine_kw(case, rank))
    dev = torch.device("cuda", device_of(rank))
    consts = expert_consts(a2a, rank)
    checked, worst = 0, 0.0
    try:
        for step in range(case.get("steps", 2)):
            c = dict(case, seed=case["seed"] + 1000 * step)
            inputs = make_inputs(c)
            mine = inputs[rank]
            sc = mine["scales"].to(dev) if mine["scales"] is not None else None
            overlap = overlap_of(case, rank, step)
            out = a2a.dispatch(
                mine["x"].to(dev), mine["idx"].to(dev), mine["w"].to(dev), sc, overlap=overlap
            )
            if overlap is not None:
                assert a2a.last_dispatch_overlapped == overlap
            a2a.synchronize()
            checked += check_dispatch(c, rank, inputs, out)
            y = expert_outputs(a2a, out, consts)
            # Odd steps add into a result that already holds values (accumulate=True).
            base = None
            if step % 2 == 1:
                n = mine["x"].shape[0]
                base = torch.randn((n, case["hidden"]), device=dev).to(a2a.combine_dtype)
            result = a2a.combine(
                y,
                out=None if base is None else base.clone(),
                accumulate=base is not None,
                overlap=overlap,
            )
            if overlap is not None:
                assert a2a.last_combine_overlapped == overlap
            a2a.synchronize()
            worst = max(worst, check_combine(c, rank, inputs, result, base))
        steps = a2a.steps()
        assert steps == [case.get("steps", 2)] * 4, steps
        return {"rows": checked, "max_err": worst, "footprint": a2a.footprint()}
    finally:
        torch.cuda.synchronize()
        a2a.close()


def _cmd_graph(state: dict, case: Dict[str, Any], rank: int, exchange_dir: str) -> Dict[str, Any]:
    """Captures the four phases (and the test experts) in one CUDA graph; replays it with new
    routing and token counts copied into its static inputs, checking every replay."""
    torch.cuda.set_device(device_of(rank))
    dev = torch.device("cuda", device_of(rank))
    a2a = _a2a(case, rank, exchange_dir, **_engine_kw(case, rank))
    T, H, K = case["max_tokens"], case["hidden"], case["topk"]
    dt = DTYPES[case["dispatch"]]
    fp8 = dt == torch.float8_e4m3fn
    sx = torch.zeros((T, H), dtype=dt, device=dev)
    ss = torch.ones((T, a2a.scales_per_token), device=dev) if fp8 else None
    sidx = torch.zeros((T, K), dtype=torch.int64, device=dev)
    sw = torch.zeros((T, K), device=dev)
    sn = torch.zeros(1, dtype=torch.int32, device=dev)
    from stolon.moe import DispatchOutput

    out = DispatchOutput(
        x=torch.zeros((a2a.capacity, H), dtype=dt, device=dev),
        scales=torch.zeros((a2a.capacity, a2a.scales_per_token), device=dev) if fp8 else None,
        counts=torch.zeros(a2a.experts_per_rank, dtype=torch.int32, device=dev),
        offsets=torch.zeros(a2a.experts_per_rank + 1, dtype=torch.int32, device=dev),
    )
    result = torch.zeros((T, H), dtype=a2a.combine_dtype, device=dev)

    def load(c: Dict[str, Any]) -> List[Dict[str, torch.Tensor]]:
        inputs = make_inputs(c)
        mine = inputs[rank]
        n = mine["x"].shape[0]
        sx.zero_()
        sx[:n] = mine["x"].to(dev)
        if fp8:
            ss[:n] = mine["scales"].to(dev)
        sidx[:n] = mine["idx"].to(dev)
        sw[:n] = mine["w"].to(dev)
        sn.fill_(n)
        return inputs

    consts = expert_consts(a2a, rank)

    def step() -> None:
        a2a.dispatch(sx, sidx, sw, ss, num_tokens=sn, out=out, overlap=overlap_of(case, rank, 0))
        y = expert_outputs(a2a, out, consts)
        a2a.combine(y, out=result, overlap=overlap_of(case, rank, 0))

    try:
        # One eager step (all ranks), then capture (runs nothing), then replays.
        inputs = load(case)
        step()
        a2a.synchronize()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            step()
        replays = case.get("replays", 3)
        for i in range(replays):
            c = dict(case, seed=case["seed"] + 7919 * (i + 1))
            c["tokens"] = [(t * (i + 2)) % (T + 1) for t in case["tokens"]]
            inputs = load(c)
            torch.cuda.synchronize()
            g.replay()
            a2a.synchronize()
            check_dispatch(c, rank, inputs, out)
            check_combine(c, rank, inputs, result[: c["tokens"][rank]])
        steps = a2a.steps()
        assert steps == [replays + 1] * 4, steps
        return {"replays": replays}
    finally:
        torch.cuda.synchronize()
        a2a.close()


def _cmd_dead_peer(
    state: dict, case: Dict[str, Any], rank: int, exchange_dir: str
) -> Dict[str, Any]:
    """Rank 0 dispatches; the others connect and then do nothing (with `silent_at` "combine":
    every rank dispatches, then only rank 0 combines). Rank 0 must get AllToAllTimeoutError
    naming a silent rank within its timeout, and stay failed."""
    from stolon.errors import AllToAllTimeoutError

    torch.cuda.set_device(device_of(rank))
    dev = torch.device("cuda", device_of(rank))
    a2a = _a2a(case, rank, exchange_dir)
    at_combine = case.get("silent_at") == "combine"
    try:
        mine = make_inputs(case)[rank]
        if at_combine:
            a2a.dispatch(
                mine["x"].to(dev), mine["idx"].to(dev), mine["w"].to(dev), overlap=case["overlap"]
            )
            a2a.synchronize()
        if rank != 0:
            # Stay silent, but keep the receive area mapped until rank 0 has given up.
            time.sleep(case["timeout"] + 3.0)
            return {"idle": True}
        t0 = time.monotonic()
        if at_combine:
            y = torch.zeros((a2a.capacity, case["hidden"]), dtype=a2a.combine_dtype, device=dev)
            a2a.combine(y, overlap=case["overlap"])
        else:
            a2a.dispatch(
                mine["x"].to(dev),
                mine["idx"].to(dev),
                mine["w"].to(dev),
                overlap=case.get("overlap"),
            )
        try:
            a2a.synchronize()
        except AllToAllTimeoutError as e:
            took = time.monotonic() - t0
            assert "timed out waiting for rank" in str(e), str(e)
        else:
            raise AssertionError("a step with a silent peer did not time out")
        # The next phase in order is refused: the timeout stays.
        try:
            if at_combine:
                a2a.dispatch(mine["x"].to(dev), mine["idx"].to(dev), mine["w"].to(dev))
            else:
                a2a.combine_send(
                    torch.zeros((a2a.capacity, case["hidden"]), dtype=a2a.combine_dtype, device=dev)
                )
        except AllToAllTimeoutError:
            pass
        else:
            raise AssertionError("a failed all-to-all accepted another phase")
        return {"took": took}
    finally:
        torch.cuda.synchronize()
        a2a.close()


def _cmd_bad_expert(
    state: dict, case: Dict[str, Any], rank: int, exchange_dir: str
) -> Dict[str, Any]:
    """An out-of-range expert id: check_routing raises before anything is sent."""
    from stolon.errors import InvalidArgumentError

    torch.cuda.set_device(device_of(rank))
    dev = torch.device("cuda", device_of(rank))
    a2a = _a2a(case, rank, exchange_dir)
    try:
        mine = make_inputs(case)[rank]
        idx = mine["idx"].clone()
        idx[0, 0] = case["experts"]
        try:
            a2a.dispatch_send(mine["x"].to(dev), idx.to(dev), mine["w"].to(dev), check_routing=True)
        except InvalidArgumentError as e:
            assert "expert" in str(e)
        else:
            raise AssertionError("an out-of-range expert id was accepted")
        assert a2a.steps() == [0, 0, 0, 0]
        return {"ok": True}
    finally:
        a2a.close()


def _cmd_capacity(
    state: dict, case: Dict[str, Any], rank: int, exchange_dir: str
) -> Dict[str, Any]:
    """Too small a dispatch capacity: the step completes on every rank, synchronize raises a
    typed error naming the rows needed, and the next step runs (the error is per step)."""
    from stolon.errors import AllToAllError

    torch.cuda.set_device(device_of(rank))
    dev = torch.device("cuda", device_of(rank))
    a2a = _a2a(case, rank, exchange_dir, capacity=case["capacity"])
    try:
        for step in range(2):
            c = dict(case, seed=case["seed"] + step)
            mine = make_inputs(c)[rank]
            a2a.dispatch(
                mine["x"].to(dev),
                mine["idx"].to(dev),
                mine["w"].to(dev),
                overlap=overlap_of(case, rank, step),
            )
            target = c["seed"] % c["world"]  # this step's "one_rank" routing's only destination
            try:
                a2a.synchronize()
            except AllToAllError as e:
                assert rank == target and "exceed the dispatch capacity" in str(e), str(e)
            else:
                assert rank != target, "a dispatch past the capacity was not reported"
            y = torch.zeros((a2a.capacity, case["hidden"]), dtype=a2a.combine_dtype, device=dev)
            a2a.combine(y, overlap=overlap_of(case, rank, step))
            a2a.synchronize()
        assert a2a.steps() == [2, 2, 2, 2]
        return {"ok": True}
    finally:
        a2a.close()


def run_all(pool, cmd: str, case: Dict[str, Any], exchange_dir: str, world: Sequence[int]) -> list:
    return pool.all(
        list(world), cmd, per=[{"rank": r} for r in world], case=case, exchange_dir=exchange_dir
    )
