"""The plan of one shape class, relative to its slots (see :mod:`.plan`).

Parameters of one shape class share one relative plan: the boxes of the source replicas
intersected with those of the destination replicas, in slot numbers and offsets relative to each
slot's base, with the fp8 scale routing and shared tiles. :func:`.plan.build_plan` instantiates it
for every parameter of the class, and with ``verify=True`` checks it here first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from .geometry import _box_runs, _coalesce, _flat_boxes
from .layout import dim_shard_boxes
from .tables import check_tiling


@dataclass
class _Relative:
    """The plan of one shape class, in slot numbers and offsets relative to slot bases."""

    data: Dict[str, np.ndarray]  # src_slot, dst_slot, src_off, dst_off, length, count, strides
    scales: Dict[str, np.ndarray]
    shared_tile: np.ndarray  # tiles with >= 2 contributing slots
    shared_ptr: np.ndarray
    shared_slots: np.ndarray


def _source_boxes(
    shape: Tuple[int, ...], geo: tuple, slot0: int
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of one source replica: ``(lo, hi, slot, frame_lo, frame_shape)``."""
    nd = len(shape)
    if geo[0] == "d":
        _, dim, parts = geo
        lo, hi = dim_shard_boxes(shape, dim, parts)
        keep = np.all(hi > lo, axis=1)
        slot = slot0 + np.arange(parts)
        return lo[keep], hi[keep], slot[keep], lo[keep], (hi - lo)[keep]
    iv = geo[1]
    los: List[List[int]] = []
    his: List[List[int]] = []
    slots: List[int] = []
    for k in range(len(iv) // 2):
        for blo, bhi in _flat_boxes(iv[2 * k], iv[2 * k + 1], shape):
            los.append(blo)
            his.append(bhi)
            slots.append(slot0 + k)
    lo = np.array(los, dtype=np.int64).reshape(-1, nd)
    hi = np.array(his, dtype=np.int64).reshape(-1, nd)
    n = lo.shape[0]
    return (
        lo,
        hi,
        np.array(slots, dtype=np.int64),
        np.zeros((n, nd), np.int64),
        np.tile(np.asarray(shape, dtype=np.int64), (n, 1)),
    )


def _relative_plan(
    shape: Tuple[int, ...],
    src_geo: Tuple[tuple, ...],
    src_nslots: Tuple[int, ...],
    dst_geo: Tuple[tuple, ...],
    rot: int,
    block: Optional[Tuple[int, int]],
) -> _Relative:
    """Intersects the source replicas' boxes with the destination replicas' boxes."""
    src_parts = []
    s0 = 0
    for g, ns in zip(src_geo, src_nslots):
        src_parts.append(_source_boxes(shape, g, s0))
        s0 += ns
    n_src_rep = len(src_geo)
    pieces = []  # (lo, hi, src_slot, src frame lo, src frame shape, dst slot, dst lo, dst shape)
    d0 = 0
    for q, (_, dim, parts) in enumerate(dst_geo):
        dlo, dhi = dim_shard_boxes(shape, dim, parts)
        dslot = d0 + np.arange(parts)
        d0 += parts
        keep = np.all(dhi > dlo, axis=1)
        dlo, dhi, dslot = dlo[keep], dhi[keep], dslot[keep]
        slo, shi, sslot, sflo, sfsh = src_parts[(q + rot) % n_src_rep]
        lo = np.maximum(slo[:, None, :], dlo[None, :, :])
        hi = np.minimum(shi[:, None, :], dhi[None, :, :])
        ok = np.all(hi > lo, axis=2)
        si, di = np.nonzero(ok)
        pieces.append(
            (
                lo[si, di],
                hi[si, di],
                sslot[si],
                sflo[si],
                sfsh[si],
                dslot[di],
                dlo[di],
                (dhi - dlo)[di],
            )
        )
    cat = [np.concatenate([p[j] for p in pieces]) for j in range(8)]
    lo, hi, sslot, sflo, sfsh, dslot, dlo, dsh = cat
    piece, so, do, ln, cnt, sst, dstr = _box_runs(lo, hi, sflo, sfsh, dlo, dsh)
    data = {
        "src_slot": sslot[piece],
        "dst_slot": dslot[piece],
        "src_off": so,
        "dst_off": do,
        "length": ln,
        "count": cnt,
        "src_stride": sst,
        "dst_stride": dstr,
    }
    data = _sorted_coalesced(data)
    if block is None:
        empty = np.zeros(0, dtype=np.int64)
        return _Relative(data, _empty_rel(), empty, np.zeros(1, np.int64), empty)
    # --- fp8: scale routing (by tile anchor) and shared tiles ---
    bl = np.asarray(block, dtype=np.int64)
    grid = -(-np.asarray(shape, dtype=np.int64) // bl)
    dhi = dlo + dsh
    bs = np.where(lo == dlo, dlo // bl, -(-lo // bl))
    be = -(-hi // bl)
    ok = np.all(be > bs, axis=1)
    g_lo = dlo[ok] // bl
    g_sh = -(-dhi[ok] // bl) - g_lo
    n_ok = int(ok.sum())
    piece, so, do, ln, cnt, sst, dstr = _box_runs(
        bs[ok], be[ok], np.zeros((n_ok, 2), np.int64), np.tile(grid, (n_ok, 1)), g_lo, g_sh
    )
    scales = {
        "src_slot": sslot[ok][piece],
        "dst_slot": dslot[ok][piece],
        "src_off": so,
        "dst_off": do,
        "length": ln,
        "count": cnt,
        "src_stride": sst,
        "dst_stride": dstr,
    }
    scales = _sorted_coalesced(scales)
    # tiles touched per source slot (2-d difference arrays), shared = touched by >= 2 slots
    used = np.unique(sslot)
    if used.size < 2:
        empty = np.zeros(0, dtype=np.int64)
        return _Relative(data, scales, empty, np.zeros(1, np.int64), empty)
    sidx = np.searchsorted(used, sslot)
    t0 = lo // bl
    t1 = -(-hi // bl)
    diff = np.zeros((used.size, grid[0] + 1, grid[1] + 1), dtype=np.int32)
    np.add.at(diff, (sidx, t0[:, 0], t0[:, 1]), 1)
    np.add.at(diff, (sidx, t0[:, 0], t1[:, 1]), -1)
    np.add.at(diff, (sidx, t1[:, 0], t0[:, 1]), -1)
    np.add.at(diff, (sidx, t1[:, 0], t1[:, 1]), 1)
    touched = diff.cumsum(1).cumsum(2)[:, : grid[0], : grid[1]] > 0
    touched = touched.reshape(used.size, -1)
    shared = np.flatnonzero(touched.sum(0) >= 2)
    sub = touched[:, shared]  # (slots, shared tiles)
    tile_i, slot_i = np.nonzero(sub.T)
    ptr = np.zeros(shared.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(tile_i, minlength=shared.size), out=ptr[1:])
    return _Relative(data, scales, shared.astype(np.int64), ptr, used[slot_i])


def _empty_rel() -> Dict[str, np.ndarray]:
    z = np.zeros(0, dtype=np.int64)
    return {
        k: z
        for k in (
            "src_slot",
            "dst_slot",
            "src_off",
            "dst_off",
            "length",
            "count",
            "src_stride",
            "dst_stride",
        )
    }


def _sorted_coalesced(r: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    order = np.lexsort((r["dst_off"], r["dst_slot"], r["src_slot"]))
    r = {k: v[order] for k, v in r.items()}
    return _coalesce(r, ("src_slot", "dst_slot"))


def _verify_relative(
    shape: Tuple[int, ...], dgeo: Tuple[tuple, ...], rel: _Relative, block: Optional[tuple]
) -> None:
    """Exact tiling check of one shape class (destination slots as keys)."""
    keys, sizes, skeys, ssizes = [], [], [], []
    s = 0
    for _, dim, parts in dgeo:
        lo, hi = dim_shard_boxes(shape, dim, parts)
        for k in range(parts):
            n = int(np.prod(hi[k] - lo[k]))
            if n:
                keys.append(s + k)
                sizes.append(n)
                if block is not None:
                    bl = np.asarray(block)
                    skeys.append(s + k)
                    ssizes.append(int(np.prod(-(-hi[k] // bl) - lo[k] // bl)))
        s += parts
    d = rel.data
    check_tiling(
        f"shape class {shape}",
        d["dst_slot"],
        d["dst_off"],
        d["length"],
        d["count"],
        d["dst_stride"],
        np.asarray(keys),
        np.asarray(sizes),
    )
    if block is not None:
        c = rel.scales
        check_tiling(
            f"scales of shape class {shape}",
            c["dst_slot"],
            c["dst_off"],
            c["length"],
            c["count"],
            c["dst_stride"],
            np.asarray(skeys),
            np.asarray(ssizes),
        )
