"""The planner's geometry: boxes of row-major tensors turned into strided ranges.

Every shard is a box of its tensor (``lo`` and ``hi`` per dimension). :func:`_box_runs` turns
boxes into strided ranges between two row-major frames, :func:`_flat_boxes` covers an interval of
flat elements (an FSDP flat shard) with boxes, and :func:`_coalesce` merges ranges that continue
each other. Pure numpy; :mod:`.shape_class` uses it for each shape class.
"""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np


def _flat_boxes(a: int, b: int, shape: Tuple[int, ...]) -> List[Tuple[List[int], List[int]]]:
    """Boxes covering flat (row-major) elements ``[a, b)`` of ``shape``: at most ``2*ndim-1``."""
    if a >= b:
        return []
    if len(shape) == 1:
        return [([a], [b])]
    inner = math.prod(shape[1:])
    i0, r0 = divmod(a, inner)
    i1, r1 = divmod(b, inner)
    if i0 == i1:
        return [([i0] + lo, [i0 + 1] + hi) for lo, hi in _flat_boxes(r0, r1, shape[1:])]
    out: List[Tuple[List[int], List[int]]] = []
    if r0:
        out += [([i0] + lo, [i0 + 1] + hi) for lo, hi in _flat_boxes(r0, inner, shape[1:])]
        i0 += 1
    if i1 > i0:
        out.append(([i0] + [0] * (len(shape) - 1), [i1] + list(shape[1:])))
    if r1:
        out += [([i1] + lo, [i1 + 1] + hi) for lo, hi in _flat_boxes(0, r1, shape[1:])]
    return out


def _row_strides(shape: np.ndarray) -> np.ndarray:
    """Row-major element strides of each row of ``shape`` (P, nd)."""
    st = np.ones_like(shape)
    for j in range(shape.shape[1] - 2, -1, -1):
        st[:, j] = st[:, j + 1] * shape[:, j + 1]
    return st


def _box_runs(
    lo: np.ndarray,
    hi: np.ndarray,
    s_lo: np.ndarray,
    s_shape: np.ndarray,
    d_lo: np.ndarray,
    d_shape: np.ndarray,
) -> Tuple[np.ndarray, ...]:
    """Strided ranges moving boxes ``[lo, hi)`` from a row-major source frame to a row-major
    destination frame (all arrays ``(P, nd)``).

    Returns ``(piece, src_off, dst_off, length, count, src_stride, dst_stride)``; ``piece``
    indexes the input box each range came from (a box becomes one range unless it has two or
    more non-trivial outer dimensions, which only happens for 3-d and larger tensors).
    """
    p, nd = lo.shape
    ext = hi - lo
    ss, ds = _row_strides(s_shape), _row_strides(d_shape)
    src0 = ((lo - s_lo) * ss).sum(1)
    dst0 = ((lo - d_lo) * ds).sum(1)
    full = (ext == s_shape) & (ext == d_shape)
    # k = innermost dim at which runs stop being contiguous in both frames
    trail = np.zeros(p, dtype=np.int64)
    alive = np.ones(p, dtype=bool)
    for j in range(nd - 1, 0, -1):
        alive &= full[:, j]
        trail += alive
    k = nd - 1 - trail
    length = np.ones(p, dtype=np.int64)
    for j in range(nd):
        length = np.where(j >= k, length * ext[:, j], length)
    outer = (np.arange(nd)[None, :] < k[:, None]) & (ext > 1)
    n_outer = outer.sum(1)
    simple = n_outer <= 1
    m = np.where(n_outer > 0, nd - 1 - np.argmax(outer[:, ::-1], axis=1), 0)
    rows = np.arange(p)
    count = np.where(n_outer > 0, ext[rows, m], 1)
    s_st = np.where(n_outer > 0, ss[rows, m], length)
    d_st = np.where(n_outer > 0, ds[rows, m], length)
    out = [
        rows[simple],
        src0[simple],
        dst0[simple],
        length[simple],
        count[simple],
        s_st[simple],
        d_st[simple],
    ]
    for i in np.flatnonzero(~simple):  # 3-d and up: enumerate all but the innermost outer dim
        dims = [j for j in range(nd) if outer[i, j]]
        inner_dim = dims[-1]
        grids = np.meshgrid(*[np.arange(ext[i, j]) for j in dims[:-1]], indexing="ij")
        idx = np.stack([g.reshape(-1) for g in grids], axis=1)
        so = src0[i] + idx @ ss[i, dims[:-1]]
        do = dst0[i] + idx @ ds[i, dims[:-1]]
        n = so.size
        out[0] = np.concatenate([out[0], np.full(n, i)])
        out[1] = np.concatenate([out[1], so])
        out[2] = np.concatenate([out[2], do])
        out[3] = np.concatenate([out[3], np.full(n, length[i])])
        out[4] = np.concatenate([out[4], np.full(n, ext[i, inner_dim])])
        out[5] = np.concatenate([out[5], np.full(n, ss[i, inner_dim])])
        out[6] = np.concatenate([out[6], np.full(n, ds[i, inner_dim])])
    piece, so, do, ln, cnt, sst, dst = out
    # count > 1 runs that are back to back on both sides are one contiguous run
    flat = (cnt > 1) & (sst == ln) & (dst == ln)
    ln = np.where(flat, ln * cnt, ln)
    cnt = np.where(flat, 1, cnt)
    sst = np.where(cnt == 1, ln, sst)
    dst = np.where(cnt == 1, ln, dst)
    return piece, so, do, ln, cnt, sst, dst


def _merge_groups(keep_prev: np.ndarray) -> np.ndarray:
    """Group id per row, a new group where ``keep_prev`` is False (row 0 always starts one)."""
    return np.cumsum(np.concatenate(([True], ~keep_prev[1:]))) - 1


def _coalesce(r: Dict[str, np.ndarray], slot_cols: Tuple[str, str]) -> Dict[str, np.ndarray]:
    """Merges ranges of the same (source slot, destination slot) that continue each other.

    Rows must be sorted by (slots, dst_off). Three kinds of merge: contiguous runs (count 1)
    back to back on both sides; strided ranges with equal shape stacked; a single run that is
    the row just before or after a strided range with its length.
    """
    a, b = slot_cols

    def same(x: Dict[str, np.ndarray]) -> np.ndarray:
        s = np.zeros(x["length"].size, dtype=bool)
        s[1:] = (x[a][1:] == x[a][:-1]) & (x[b][1:] == x[b][:-1])
        return s

    def regroup(x: Dict[str, np.ndarray], m: np.ndarray, how: str) -> Dict[str, np.ndarray]:
        g = _merge_groups(m)
        first = np.flatnonzero(np.concatenate(([True], ~m[1:])))
        y = {k: v[first] for k, v in x.items()}
        if how == "length":
            y["length"] = np.bincount(g, weights=x["length"]).astype(np.int64)
            one = y["count"] == 1  # merged rows are single runs; strided rows keep their strides
            y["src_stride"] = np.where(one, y["length"], y["src_stride"])
            y["dst_stride"] = np.where(one, y["length"], y["dst_stride"])
        else:
            y["count"] = np.bincount(g, weights=x["count"]).astype(np.int64)
        return y

    if r["length"].size < 2:
        return r
    # 1. contiguous runs
    c1 = r["count"] == 1
    m = same(r)
    m[1:] &= c1[1:] & c1[:-1]
    m[1:] &= r["src_off"][1:] == r["src_off"][:-1] + r["length"][:-1]
    m[1:] &= r["dst_off"][1:] == r["dst_off"][:-1] + r["length"][:-1]
    if m.any():
        r = regroup(r, m, "length")
    # 2. a single run right before a strided range of its length: prepend it
    for _ in range(2):
        n = r["length"].size
        if n < 2:
            return r
        c1 = r["count"] == 1
        m = same(r)
        ok = np.zeros(n, dtype=bool)
        ok[1:] = (
            m[1:]
            & c1[:-1]
            & ~c1[1:]
            & (r["length"][1:] == r["length"][:-1])
            & (r["src_off"][1:] == r["src_off"][:-1] + r["src_stride"][1:])
            & (r["dst_off"][1:] == r["dst_off"][:-1] + r["dst_stride"][1:])
        )
        if ok.any():  # row i-1 absorbed by row i: give i its offsets, drop i-1
            i = np.flatnonzero(ok)
            for col in ("src_off", "dst_off"):
                r[col][i] = r[col][i - 1]
            r["count"][i] += 1
            keep = np.ones(n, dtype=bool)
            keep[i - 1] = False
            r = {k: v[keep] for k, v in r.items()}
        # 3. a single run right after a strided range of its length: append it
        n = r["length"].size
        if n < 2:
            return r
        c1 = r["count"] == 1
        m = same(r)
        ok = np.zeros(n, dtype=bool)
        ok[1:] = (
            m[1:]
            & c1[1:]
            & ~c1[:-1]
            & (r["length"][1:] == r["length"][:-1])
            & (r["src_off"][1:] == r["src_off"][:-1] + r["count"][:-1] * r["src_stride"][:-1])
            & (r["dst_off"][1:] == r["dst_off"][:-1] + r["count"][:-1] * r["dst_stride"][:-1])
        )
        # a run absorbed as a tail must not also have absorbed a head of its own (it has count 1)
        if ok.any():
            i = np.flatnonzero(ok)
            r["count"][i - 1] += 1
            keep = np.ones(n, dtype=bool)
            keep[i] = False
            r = {k: v[keep] for k, v in r.items()}
        # 4. strided ranges of one shape stacked
        n = r["length"].size
        if n < 2:
            return r
        m = same(r)
        cn = r["count"] > 1
        m[1:] &= (
            cn[1:]
            & cn[:-1]
            & (r["length"][1:] == r["length"][:-1])
            & (r["src_stride"][1:] == r["src_stride"][:-1])
            & (r["dst_stride"][1:] == r["dst_stride"][:-1])
            & (r["src_off"][1:] == r["src_off"][:-1] + r["count"][:-1] * r["src_stride"][:-1])
            & (r["dst_off"][1:] == r["dst_off"][:-1] + r["count"][:-1] * r["dst_stride"][:-1])
        )
        if m.any():
            r = regroup(r, m, "count")
    return r
