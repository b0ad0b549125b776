"""In-process simulation: every rank's program with memory copies instead of an engine."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .program import _Program, _Request
from .slots import WeightSnapshot, slot_layout, unpack_slot
from .tables import WeightPlan

__all__ = ["simulate"]


def simulate(
    plan: WeightPlan,
    buffers: Mapping[int, Mapping[str, np.ndarray]],
    *,
    version: int = 0,
    staging_bytes: int = 1 << 16,
    depth: int = 2,
    host_copy: bool = False,
    device: Optional[str] = None,
) -> Dict[int, WeightSnapshot]:
    """Runs every training rank's program with memory copies instead of writes; returns each
    inference rank's snapshot. ``buffers[rank]`` are that training rank's buffers (torch
    tensors with ``device``: the torch program, gathering and converting on that device)."""
    kw: Dict[str, Any] = dict(staging_bytes=staging_bytes, depth=depth, host_copy=host_copy)
    if device is not None:
        from .gpu import TorchProgram

        kw["device"] = device
    make: Any = _Program if device is None else TorchProgram
    progs = {
        r: make(plan, r, buffers[r], **kw)
        for r in range(plan.train.world)
        if len(plan.data.for_src(r)) or len(plan.scales.for_src(r))
    }
    layouts = {d: slot_layout(plan, d) for d in range(plan.infer.world)}
    slots: Dict[int, Any] = {}
    for d, lay in layouts.items():
        if device is None:
            slots[d] = np.zeros(lay.slot_bytes, dtype=np.uint8)
        else:  # torch host memory: snapshots are torch tensors (no ml_dtypes needed)
            import torch

            slots[d] = torch.zeros(lay.slot_bytes, dtype=torch.uint8)
    for pr in progs.values():
        pr.local_amax()
    for r, pr in progs.items():
        for q in pr.peers:
            pr.merge(q, progs[q].partials(r))
    for pr in progs.values():
        pr.finish_scales()
        pr.stamp[0] = version
        reqs = list(pr.scale_requests)
        for b in pr.batches:
            pr.fill(b)  # a real sender fills a ring buffer only after its writes completed;
            _apply(pr, b.requests, slots)  # here each batch lands before the next fill
        _apply(pr, reqs + pr.stamp_requests, slots)
    return {d: unpack_slot(layouts[d], slots[d], version) for d in layouts}


def _apply(pr: _Program, reqs: List[_Request], slots: Dict[int, Any]) -> None:
    pr.sync()
    for r in reqs:
        src = pr.source(r[1])
        if not isinstance(src, np.ndarray):  # torch: the bytes on the host
            src = src.cpu()
        if r[0] == "scatter":
            for d, so, do, n in r[2]:
                slots[d][do : do + n] = src[so : so + n]
        else:
            _, _, d, pb, cnt, so, sst, do, dst = r
            for k in range(cnt):
                slots[d][do + k * dst : do + k * dst + pb] = src[so + k * sst : so + k * sst + pb]
