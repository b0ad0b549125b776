#!/usr/bin/env python3
"""Plans a Kimi-K2-sized weight update (about 1T parameters) and predicts its time.

Training: 256 ranks as PP2 x EP8 x FSDP16 (bf16; experts FSDP-sharded 16 ways inside their EP
group, the rest 128 ways per pipeline stage). Inference: 128 ranks as 4 replicas of EP32 for the
routed experts and 16 replicas of TP8 for the rest, weights in fp8 e4m3 with 128x128 tile scales.

    python benchmarks/bench_weights_plan.py --json /tmp/weights_plan.json

Reports the planner's wall time and peak RSS (``resource.getrusage``), the plan's size, a
verification that every byte and every tile scale is written exactly once (per shape class, then
by brute force over all ~1e8 runs, a few inference ranks at a time), and the cost model's
prediction (:class:`stolon.weights.plan.CostModel`) with the stage that bounds it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Dict

from stolon.weights import (
    build_plan,
    ep_tp_inference,
    fsdp_pp_ep_training,
    kimi_k2_model,
    moe_model,
)
from stolon.weights.plan import CostModel

GB = 1e9


def peak_rss_gb() -> float:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def main(argv: Any = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a reduced model (seconds, for CI)")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--fsdp", type=int, default=16)
    ap.add_argument("--align", type=int, default=1, help="FSDP shard alignment (elements)")
    ap.add_argument("--infer-world", type=int, default=128)
    ap.add_argument("--infer-ep", type=int, default=32)
    ap.add_argument("--infer-tp", type=int, default=8)
    ap.add_argument("--no-fp8", action="store_true", help="bf16 on the inference side too")
    ap.add_argument("--verify", choices=["none", "classes", "full"], default="full")
    ap.add_argument("--link-gbps", type=float, default=400.0)
    ap.add_argument("--link-efficiency", type=float, default=1.0)
    ap.add_argument("--h2d-gbs", type=float, default=50.0)
    ap.add_argument("--no-offload", action="store_true", help="training params already on GPU")
    ap.add_argument("--convert-tbs", type=float, default=1.0)
    ap.add_argument("--ops-per-s", type=float, default=10e6)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--rtt-us", type=float, default=10.0)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)

    res: Dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    t0 = time.perf_counter()
    if a.small:
        model = moe_model(
            layers=4,
            dense_layers=1,
            experts=32,
            hidden=512,
            expert_inter=128,
            dense_inter=1024,
            shared_experts=1,
            vocab=4096,
            heads=4,
            q_lora=192,
            kv_lora=64,
            qk_nope=32,
            qk_rope=16,
            v_head=32,
        )
        a.pp, a.ep, a.fsdp, a.infer_world, a.infer_ep, a.infer_tp = 2, 4, 4, 16, 8, 4
    else:
        model = kimi_k2_model()
    t1 = time.perf_counter()
    train = fsdp_pp_ep_training(model, pp=a.pp, ep=a.ep, fsdp=a.fsdp, align=a.align)
    infer = ep_tp_inference(
        model, world=a.infer_world, ep=a.infer_ep, tp=a.infer_tp, fp8=not a.no_fp8
    )
    t2 = time.perf_counter()
    plan = build_plan(train, infer)
    t3 = time.perf_counter()
    rss_plan = peak_rss_gb()
    summary = plan.summary()
    res["model"] = {
        "params": len(model.params),
        "numel": model.numel,
        "bf16_bytes": 2 * model.numel,
    }
    res["layout"] = {
        "train": f"PP{a.pp} x EP{a.ep} x FSDP{a.fsdp} = {train.world}",
        "infer": f"{a.infer_world // a.infer_ep} x EP{a.infer_ep}, "
        f"{a.infer_world // a.infer_tp} x TP{a.infer_tp}, "
        f"{'bf16' if a.no_fp8 else 'fp8 128x128'}",
        "align": a.align,
    }
    res["planner"] = {
        "model_s": round(t1 - t0, 3),
        "layouts_s": round(t2 - t1, 3),
        "plan_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "peak_rss_gb": round(rss_plan, 3),
        **summary,
    }
    if a.verify != "none":
        t4 = time.perf_counter()
        again = build_plan(train, infer, verify=True)
        assert again.fingerprint() == plan.fingerprint()
        t5 = time.perf_counter()
        res["verify"] = {"per_class_s": round(t5 - t4, 3)}
        if a.verify == "full":
            plan.verify(ranks_per_pass=8)
            res["verify"]["full_s"] = round(time.perf_counter() - t5, 3)
            res["verify"]["runs_checked"] = int(plan.data.count.sum() + plan.scales.count.sum())
        res["verify"]["peak_rss_gb"] = round(peak_rss_gb(), 3)
    cm = CostModel(
        link_gbps=a.link_gbps,
        link_efficiency=a.link_efficiency,
        h2d_gbs=a.h2d_gbs,
        offload=not a.no_offload,
        convert_tbs=a.convert_tbs,
        ops_per_s=a.ops_per_s,
        chunk_bytes=a.chunk_mib << 20,
        rtt_us=a.rtt_us,
    )
    res["cost_model"] = cm.predict(plan)
    sens = {}
    for eff in (0.9, 0.8):
        cm.link_efficiency = eff
        sens[str(eff)] = round(float(cm.predict(plan)["update_s"]), 4)  # type: ignore[arg-type]
    res["cost_model"]["update_s_at_link_efficiency"] = sens

    p, c = res["planner"], res["cost_model"]
    print(
        f"model      {res['model']['params']} tensors, {model.numel / 1e9:.1f}B params "
        f"({2 * model.numel / GB:.1f} GB bf16)"
    )

    print(f"layouts    train {res['layout']['train']}; infer {res['layout']['infer']}")
    print(
        f"planner    {p['plan_s']:.2f} s plan ({p['total_s']:.2f} s with model + layouts), "
        f"peak RSS {p['peak_rss_gb']:.2f} GB"
    )
    print(
        f"plan       {p['shape_classes']} shape classes, {p['data_ranges']} data ranges, "
        f"{p['scale_ranges']} scale ranges, {p['shared_tiles']} shared tiles, "
        f"{p['pairs']} (train, infer) pairs, {p['plan_bytes'] / 1e6:.0f} MB"
    )
    if "verify" in res:
        v = res["verify"]
        print(
            f"verify     exact per shape class {v['per_class_s']:.2f} s"
            + (
                f"; brute force over {v['runs_checked']} runs {v['full_s']:.1f} s"
                if "full_s" in v
                else ""
            )
            + f"; peak RSS {v['peak_rss_gb']:.2f} GB"
        )
    print(
        f"traffic    per inference GPU {c['recv_bytes_max'] / GB:.2f} GB (mean "
        f"{c['recv_bytes_mean'] / GB:.2f}), per training GPU max {c['send_bytes_max'] / GB:.2f}"
        f" GB (mean {c['send_bytes_mean'] / GB:.2f}); ops max in {c['recv_ops_max']:.0f}, "
        f"out {c['send_ops_max']:.0f}"
    )
    print("stages     " + ", ".join(f"{k} {v:.3f} s" for k, v in c["stages_s"].items()))
    print(
        f"predicted  {c['update_s']:.3f} s per update at {a.link_gbps:.0f} Gbit/s per GPU "
        f"(bound: {c['bound']}); at 90% / 80% link efficiency: "
        f"{sens['0.9']:.3f} / {sens['0.8']:.3f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2, default=float)
        print(f"wrote {a.json}")
    return res


if __name__ == "__main__":
    main()
