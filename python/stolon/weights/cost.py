"""The cost model: one update's time predicted from a plan, stage by stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from .layout import ITEMSIZE
from .tables import PACK_ROWS_BELOW, WeightPlan

__all__ = ["CostModel"]


@dataclass
class CostModel:
    """Predicts one update's time from a plan, stage by stage (constants are calibratable).

    Per training GPU the pipeline has four stages, overlapped chunk by chunk: host-to-device
    copy of its parameter buffers (``offload``), fp8 conversion (two passes over the bf16 source
    of every fp8 range: tile maxima, then conversion), posting the writes (one operation per run
    of a strided range, at ``ops_per_s``), and the link out. Per inference GPU the link in. Each
    GPU has its own NIC of ``link_gbps`` per direction, scaled by ``link_efficiency``.

    ``T = max(stage totals) + pipeline fill/drain + latencies`` where fill/drain is one
    ``chunk_bytes`` chunk through every stage but the bounding one, and the latencies are the
    round trips of the release wait, the tile-maxima exchange and the completion count.
    """

    link_gbps: float = 400.0
    link_efficiency: float = 1.0
    h2d_gbs: float = 50.0
    offload: bool = True
    convert_tbs: float = 1.0
    ops_per_s: float = 10e6
    chunk_bytes: int = 64 << 20
    rtt_us: float = 10.0

    @classmethod
    def calibrated(
        cls,
        *,
        link_gbs: float,
        ops_per_s: float,
        rtt_us: float,
        h2d_gbs: float = 50.0,
        convert_gbs: float = 1000.0,
        offload: bool = False,
        chunk_bytes: int = 64 << 20,
    ) -> CostModel:
        """A model from rates measured on the machine: ``link_gbs`` GB/s of one writer into one
        reader's GPU over the path used (a large write, timed to the receiver's count),
        ``ops_per_s`` small writes per second, ``rtt_us`` one small write's latency,
        ``h2d_gbs`` pinned host-to-device copies, ``convert_gbs`` GB/s of bf16 input through
        the fp8 conversion (both passes: tile maxima and conversion)."""
        return cls(
            link_gbps=link_gbs * 8,
            link_efficiency=1.0,
            h2d_gbs=h2d_gbs,
            offload=offload,
            convert_tbs=2 * convert_gbs / 1000,  # the model charges two passes per byte
            ops_per_s=ops_per_s,
            chunk_bytes=chunk_bytes,
            rtt_us=rtt_us,
        )

    def traffic(self, plan: WeightPlan) -> Dict[str, np.ndarray]:
        """Per-rank totals the model uses (bytes and operations)."""
        infer, train = plan.infer, plan.train
        isz_d = np.array([ITEMSIZE[infer.dtype(p.name)] for p in infer.params], dtype=np.int64)
        isz_s = np.array([ITEMSIZE[p.dtype] for p in train.params], dtype=np.int64)
        fp8 = np.array([infer.is_fp8(p.name) for p in infer.params], dtype=bool)
        d, c = plan.data, plan.scales
        el = d.elements
        wire = el * isz_d[d.param]
        ts, ti = train.world, infer.world
        # Writes per range, as the executor issues them: a range of `count` runs is `count`
        # writes, except where it goes through staging (converted, offloaded shards, or short
        # runs: PACK_ROWS_BELOW), which packs the runs back to back, and the destination holds
        # them back to back too.
        small = (d.count > 1) & (d.length * isz_d[d.param] < PACK_ROWS_BELOW)
        staged = fp8[d.param] | (isz_s[d.param] != isz_d[d.param]) | self.offload | small
        packed = staged & (d.dst_stride == d.length)
        ops = np.where(packed, 1, d.count)
        out: Dict[str, np.ndarray] = {
            "send_bytes": np.bincount(d.src_rank, wire, ts)
            + np.bincount(c.src_rank, 4 * c.elements, ts),
            "recv_bytes": np.bincount(d.dst_rank, wire, ti)
            + np.bincount(c.dst_rank, 4 * c.elements, ti),
            "convert_bytes": 2
            * np.bincount(d.src_rank, np.where(fp8[d.param], el * isz_s[d.param], 0), ts),
            "send_ops": np.bincount(d.src_rank, ops, ts) + np.bincount(c.src_rank, c.count, ts),
            "recv_ops": np.bincount(d.dst_rank, ops, ti) + np.bincount(c.dst_rank, c.count, ti),
        }
        h2d = np.zeros(ts)
        if self.offload:
            bdt = []
            for name in train.buffer_names:
                kind, rest = name.split(":", 1)
                first = train.groups[rest].params[0] if kind == "group" else rest
                bdt.append(ITEMSIZE[train.params[train.index[first]].dtype])
            for (r, b), n in train.buffer_sizes().items():
                h2d[r] += n * bdt[b]
        out["h2d_bytes"] = h2d
        return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}

    def predict(self, plan: WeightPlan) -> Dict[str, object]:
        """Stage totals (seconds, the slowest rank of each), the bound, and the update time."""
        t = self.traffic(plan)
        bw = self.link_gbps / 8 * 1e9 * self.link_efficiency
        stages = {
            "h2d": float(t["h2d_bytes"].max()) / (self.h2d_gbs * 1e9),
            "convert": float(t["convert_bytes"].max()) / (self.convert_tbs * 1e12),
            "post": float(max(t["send_ops"].max(), t["recv_ops"].max())) / self.ops_per_s,
            "link_out": float(t["send_bytes"].max()) / bw,
            "link_in": float(t["recv_bytes"].max()) / bw,
        }
        bound = max(stages, key=lambda k: stages[k])
        c = float(min(self.chunk_bytes, max(t["send_bytes"].max(), 1.0)))
        converts = bool(t["convert_bytes"].max() > 0)
        chunk = {  # one chunk of bf16 source through each stage (fp8 halves the wire bytes)
            "h2d": c / (self.h2d_gbs * 1e9) if self.offload else 0.0,
            "convert": 2 * c / (self.convert_tbs * 1e12) if converts else 0.0,
            "post": 0.0,
            "link_out": c / 2 / bw,
            "link_in": c / 2 / bw,
        }
        fill = sum(v for k, v in chunk.items() if k != bound and k != "link_in")
        latency = 3 * self.rtt_us * 1e-6
        total = stages[bound] + fill + latency
        return {
            "stages_s": stages,
            "bound": bound,
            "fill_drain_s": fill,
            "latency_s": latency,
            "update_s": total,
            "recv_bytes_max": float(t["recv_bytes"].max()),
            "recv_bytes_mean": float(t["recv_bytes"].mean()),
            "send_bytes_max": float(t["send_bytes"].max()),
            "send_bytes_mean": float(t["send_bytes"].mean()),
            "recv_ops_max": float(t["recv_ops"].max()),
            "send_ops_max": float(t["send_ops"].max()),
            "constants": {
                "link_gbps": self.link_gbps,
                "link_efficiency": self.link_efficiency,
                "h2d_gbs": self.h2d_gbs,
                "offload": self.offload,
                "convert_tbs": self.convert_tbs,
                "ops_per_s": self.ops_per_s,
                "chunk_bytes": self.chunk_bytes,
                "rtt_us": self.rtt_us,
            },
        }
