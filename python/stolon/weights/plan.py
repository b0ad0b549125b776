"""The static routing plan: which training rank writes which elements to which inference rank.

:func:`build_plan` intersects, per parameter, the boxes each training rank holds with the box each
inference rank holds, and turns every intersection into *strided ranges*: ``count`` runs of
``length`` elements, the ``k``-th read at ``src_off + k * src_stride`` of a training buffer and
written at ``dst_off + k * dst_stride`` of the inference shard (offsets in elements, of the source
dtype on the training side and of the destination dtype on the inference side). A column shard of
a row-major tensor is one strided range, not one range per row.

Plans are built per *shape class*: parameters whose geometry is the same up to which ranks hold
them and where in their buffers (every routed expert of a model, every layer's attention) share
one relative plan, computed once and instantiated for all of them with numpy indexing. Every
destination element is written by exactly one training rank: where the training side has several
replicas, each inference replica reads from one of them (rotated per parameter to spread load).

For parameters converted to blockwise fp8 the plan also holds:

- ``scales``: a second range table whose source is the parameter's tile grid (row-major, tile
  coordinates) and destination the grid of tiles the inference shard touches. The tile scale of
  ``(dst, tile)`` is written by the training rank that writes the tile's first element on ``dst``,
  so each scale, too, is written once.
- the *shared tiles*: tiles whose elements come from more than one training rank, and which ranks
  those are. Before converting, those ranks exchange their partial ``max |x|`` for shared tiles
  (a few bytes per tile) so all agree on the scale; every other tile is converted by the one rank
  that holds all of it.

The plan's data (:class:`RangeTable`, :class:`WeightPlan`, :func:`check_tiling`) is in
:mod:`.tables`, the box geometry in :mod:`.geometry`, one shape class's relative plan in
:mod:`.shape_class` and :class:`CostModel` in :mod:`.cost`; all stay importable from here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import PlanError
from .cost import CostModel
from .layout import InferenceLayout, LayoutError, TrainingLayout, _norm_dim
from .shape_class import _relative_plan, _verify_relative
from .tables import PACK_ROWS_BELOW as PACK_ROWS_BELOW  # importable from here, as before
from .tables import RangeTable, WeightPlan, check_tiling
from .tables import iter_runs as iter_runs  # importable from here, as before

__all__ = ["PlanError", "RangeTable", "WeightPlan", "build_plan", "check_tiling", "CostModel"]


@dataclass
class _Batch:
    """Parameters of one shape class and where their slots are."""

    params: List[int] = field(default_factory=list)
    src_rank: List[List[int]] = field(default_factory=list)
    src_buf: List[List[int]] = field(default_factory=list)
    src_base: List[List[int]] = field(default_factory=list)
    dst_rank: List[List[int]] = field(default_factory=list)
    dst_numel: List[int] = field(default_factory=list)


def _shape_classes(train: TrainingLayout, infer: InferenceLayout) -> Dict[tuple, _Batch]:
    batches: Dict[tuple, _Batch] = {}
    dst_geo_cache: Dict[Tuple[int, int], Tuple[tuple, List[int]]] = {}
    for i, p in enumerate(train.params):
        reps = train.source_replicas(i)
        src_geo = tuple(g for g, _ in reps)
        nslots = tuple(len(s) for _, s in reps)
        rot = i % len(reps)
        dpl = infer.placements[p.name]
        dk = (id(dpl), len(p.shape))  # placements are shared objects; they outlive this loop
        hit = dst_geo_cache.get(dk)
        if hit is None:
            geo = tuple(("d", _norm_dim(pl.dim, len(p.shape), p.name), len(pl.ranks)) for pl in dpl)
            hit = dst_geo_cache[dk] = (geo, [r for pl in dpl for r in pl.ranks])
        dgeo, dranks = hit
        fp8 = infer.is_fp8(p.name)
        key = (p.shape, src_geo, nslots, dgeo, rot, fp8)
        b = batches.get(key)
        if b is None:
            b = batches[key] = _Batch()
        b.params.append(i)
        slots = [s for _, ss in reps for s in ss]
        b.src_rank.append([s.rank for s in slots])
        b.src_buf.append([s.buffer for s in slots])
        b.src_base.append([s.base for s in slots])
        b.dst_rank.append(dranks)
    return batches


def _instantiate(
    rel: Dict[str, np.ndarray],
    pids: np.ndarray,
    src_rank: np.ndarray,
    src_buf: Optional[np.ndarray],
    src_base: Optional[np.ndarray],
    dst_rank: np.ndarray,
) -> Dict[str, np.ndarray]:
    n = rel["length"].size
    p = pids.size
    ss, ds = rel["src_slot"], rel["dst_slot"]
    out = {
        "param": np.repeat(pids, n),
        "src_rank": src_rank[:, ss].reshape(-1),
        "src_buf": (src_buf[:, ss] if src_buf is not None else np.full((p, n), -1)).reshape(-1),
        "src_off": (
            (rel["src_off"][None, :] + src_base[:, ss])
            if src_base is not None
            else np.tile(rel["src_off"], (p, 1))
        ).reshape(-1),
        "dst_rank": dst_rank[:, ds].reshape(-1),
    }
    for c in ("dst_off", "length", "count", "src_stride", "dst_stride"):
        out[c] = np.tile(rel[c], p)
    return out


def build_plan(
    train: TrainingLayout, infer: InferenceLayout, *, verify: bool = False
) -> WeightPlan:
    """Computes the routing plan (see the module docstring).

    ``verify=True`` checks each shape class's relative plan exactly (every destination slot
    tiled once, data and scales) before instantiating it; that, plus distinct ranks per slot
    (which the layouts guarantee), proves the whole plan covers every byte exactly once without
    expanding it. :meth:`WeightPlan.verify` is the brute-force check for small plans.
    """
    t0 = time.perf_counter()
    if [(p.name, p.shape, p.dtype) for p in train.params] != [
        (p.name, p.shape, p.dtype) for p in infer.params
    ]:
        raise LayoutError("training and inference layouts list different parameters")
    batches = _shape_classes(train, infer)
    data_parts: List[Dict[str, np.ndarray]] = []
    scale_parts: List[Dict[str, np.ndarray]] = []
    sh_param: List[np.ndarray] = []
    sh_tile: List[np.ndarray] = []
    sh_len: List[np.ndarray] = []
    sh_rank: List[np.ndarray] = []
    for key, b in batches.items():
        shape, src_geo, nslots, dgeo, rot, fp8 = key
        rel = _relative_plan(shape, src_geo, nslots, dgeo, rot, infer.block if fp8 else None)
        if verify:
            _verify_relative(shape, dgeo, rel, infer.block if fp8 else None)
        pids = np.asarray(b.params, dtype=np.int64)
        s_rank = np.asarray(b.src_rank, dtype=np.int64)
        s_buf = np.asarray(b.src_buf, dtype=np.int64)
        s_base = np.asarray(b.src_base, dtype=np.int64)
        d_rank = np.asarray(b.dst_rank, dtype=np.int64)
        data_parts.append(_instantiate(rel.data, pids, s_rank, s_buf, s_base, d_rank))
        if fp8:
            scale_parts.append(_instantiate(rel.scales, pids, s_rank, None, None, d_rank))
            if rel.shared_tile.size:
                nt = rel.shared_tile.size
                sh_param.append(np.repeat(pids, nt))
                sh_tile.append(np.tile(rel.shared_tile, pids.size))
                sh_len.append(np.tile(np.diff(rel.shared_ptr), pids.size))
                sh_rank.append(s_rank[:, rel.shared_slots].reshape(-1))
    data = RangeTable.concat(data_parts)
    scales = RangeTable.concat(scale_parts)
    lens = np.concatenate(sh_len) if sh_len else np.zeros(0, np.int64)
    ptr = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=ptr[1:])
    plan = WeightPlan(
        train=train,
        infer=infer,
        data=data,
        scales=scales,
        shared_param=(np.concatenate(sh_param) if sh_param else np.zeros(0, np.int64)).astype(
            np.int32
        ),
        shared_tile=np.concatenate(sh_tile) if sh_tile else np.zeros(0, np.int64),
        shared_ptr=ptr,
        shared_ranks=(np.concatenate(sh_rank) if sh_rank else np.zeros(0, np.int64)).astype(
            np.int32
        ),
        shape_classes=len(batches),
    )
    plan.build_seconds = time.perf_counter() - t0
    return plan
