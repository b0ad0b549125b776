"""Weight transfer with torch / GPU memory (stolon.weights, GPU path of issue 7).

- In one process: the torch executor (``TorchProgram``: gather, tile maxima and bf16 -> fp8
  e4m3 conversion as torch ops on the device) against the whole tensors converted in one place
  (``quantize_blockwise_torch``, itself bit-identical to the numpy/ml_dtypes conversion):
  bf16 bit-exact, fp8 values and scales bit-exact, and within the conversion's error bound;
  FSDP shards cut 64 x 64 tiles, so tile maxima are merged across ranks; also with the training
  shards offloaded to host memory (host-to-device copies in the pipeline).
- Between processes (``benchmarks/bench_weights_gpu.py``'s workers): training ranks on
  ``cuda:0..``, inference ranks on the next GPUs, over the NVLink domain and staged tcp, fp8
  and bf16, column shards (strided writes) included; every inference rank verified bit-exact.

The CPU variants (torch CPU tensors over tcp) run everywhere; CUDA cases skip with a reason.
Run on a GPU machine: ``pytest -m gpu tests/test_weights_gpu.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import require_provider

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

torch = pytest.importorskip("torch", reason="torch is not installed")

from stolon.weights import build_plan  # noqa: E402
from stolon.weights.execute import simulate  # noqa: E402
from stolon.weights.gpu import (  # noqa: E402
    full_tensors,
    quantize_blockwise_torch,
    shard_buffers_torch,
)

pytestmark = pytest.mark.gpu

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_one = pytest.mark.skipif(NGPU < 1, reason="needs an NVIDIA GPU (none visible)")
needs_two = pytest.mark.skipif(NGPU < 2, reason=f"needs two NVIDIA GPUs ({NGPU} visible)")


def _bench() -> Any:
    import bench_weights_gpu

    return bench_weights_gpu


def _cfg(train: int, infer: int, **kw: Any) -> Dict[str, Any]:
    cfg = {
        "train": train, "infer": infer, "hidden": 160, "ffn": 336, "vocab": 96, "layers": 2,
        "fp8": True, "layout": "tp", "seed": 9, "block": (64, 64), "staging_bytes": 1 << 16,
        "depth": 2,
    }  # fmt: skip
    cfg.update(kw)
    return cfg


def _check(plan: Any, snaps: Dict[int, Any], full: Dict[str, Any]) -> int:
    """Every shard of every inference rank against the whole-tensor reference; returns the
    number of fp8 shards checked."""
    from stolon.weights.convert import fp8_error_bound

    infer = plan.infer
    n_fp8 = 0
    for d, snap in snaps.items():
        for name, got in snap.tensors.items():
            box = infer.shard_box(name, d)
            sl = tuple(slice(int(a), int(b)) for a, b in zip(*box))
            ref = full[name].cpu()
            if infer.is_fp8(name):
                # Converted where the sender converts: CUDA and the CPU may round a few
                # values differently, and the sender must equal the whole-tensor conversion.
                q, sc = quantize_blockwise_torch(full[name], infer.block)
                q, sc = q.cpu(), sc.cpu()
                raw = got.cpu().contiguous().view(-1)
                assert bytes(raw.view(torch.uint8).numpy()) == bytes(
                    q[sl].contiguous().view(torch.uint8).view(-1).numpy()
                ), (d, name)
                lo, hi = infer.scale_box(name, d)
                want_sc = sc[int(lo[0]) : int(hi[0]), int(lo[1]) : int(hi[1])]
                got_sc = snap.scales[name].cpu()
                assert torch.equal(got_sc, want_sc), (d, name, "scales")
                # within the conversion's tolerance: half an fp8 ulp of the original
                per = sc.repeat_interleave(infer.block[0], 0).repeat_interleave(infer.block[1], 1)
                per = per[: ref.shape[0], : ref.shape[1]][sl]
                back = q[sl].double() * per.double()  # exact: no rounding in the check
                bound = fp8_error_bound(ref[sl].float().numpy(), per.numpy())
                bound = bound * (1 + 2.0**-20)  # x / scale is rounded to float32 first
                assert ((back - ref[sl].double()).abs().numpy() <= bound).all(), (d, name)
                n_fp8 += 1
            else:
                want = ref[sl].contiguous().view(torch.uint8).view(-1)
                raw = got.cpu().contiguous().view(torch.uint8).view(-1)
                assert torch.equal(raw, want), (d, name)
    return n_fp8


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda:0", id="cuda", marks=needs_one),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offloaded"])
def test_torch_executor_matches_whole_tensor_conversion(device: str, offload: bool) -> None:
    b = _bench()
    train, infer = b.model_layouts(_cfg(3, 2))
    plan = build_plan(train, infer)
    assert plan.shared_param.size > 0  # FSDP shard edges cut tiles: maxima are merged
    full = full_tensors(train.params, 9, 0, device)
    bufs = {r: shard_buffers_torch(train, r, full) for r in range(train.world)}
    if offload:
        bufs = {r: {k: v.cpu() for k, v in bb.items()} for r, bb in bufs.items()}
    snaps = simulate(plan, bufs, staging_bytes=1 << 14, depth=2, device=device)
    assert _check(plan, snaps, full) > 0


def test_whole_tensor_torch_conversion_equals_numpy() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    from stolon.weights.convert import quantize_blockwise

    x = full_tensors(_bench().model_layouts(_cfg(1, 1))[0].params[:3], 4, 0, "cpu")
    for t in x.values():
        q, s = quantize_blockwise_torch(t, (64, 64))
        a = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        nq, ns = quantize_blockwise(a, (64, 64))
        assert nq.view(np.uint8).tobytes() == q.view(torch.uint8).numpy().tobytes()
        assert ns.tobytes() == s.numpy().tobytes()


CASES = [
    pytest.param("cpu", "tcp", 2, 2, True, id="cpu-tcp-2to2-fp8"),
    pytest.param("cuda", "nvlink", 1, 1, True, id="cuda-nvlink-1to1-fp8", marks=needs_two),
    pytest.param("cuda", "nvlink", 1, 1, False, id="cuda-nvlink-1to1-bf16", marks=needs_two),
    pytest.param("cuda", "staged", 1, 1, True, id="cuda-staged-1to1-fp8", marks=needs_two),
    pytest.param(
        "cuda", "nvlink", 2, 2, True, id="cuda-nvlink-2to2-fp8",
        marks=pytest.mark.skipif(NGPU < 4, reason=f"needs four GPUs ({NGPU} visible)"),
    ),
]  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind,path,T,I,fp8", CASES)
def test_updates_between_processes_land_exact(kind: str, path: str, T: int, I: int, fp8: bool):  # noqa: E741
    require_provider("tcp")
    b = _bench()
    devices = [f"cuda:{k}" for k in range(T + I)] if kind == "cuda" else ["cpu"] * (T + I)
    cfg = _cfg(T, I, fp8=fp8, path=path, devices=devices)
    c = b.Cluster(cfg)
    try:
        for v in range(3):  # both slots, then the first again (after its release)
            took, stats = c.update(v)
            assert took > 0 and all(s["writes"] > 0 for s in stats)
        out = c.w.all(c.iw, "verify", version=2)
        assert [o["bad"] for o in out] == [[]] * I
        assert sum(o["bytes"] for o in out) > 0
        assert c.w.all([c.tw[0]], "path")[0] == {"tcp": "fabric"}.get(path, path)
    finally:
        c.close()


def test_module_is_collected_without_gpus() -> None:
    assert Path(__file__).name == "test_weights_gpu.py"
