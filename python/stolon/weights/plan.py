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
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PlanError
from .layout import (
    ITEMSIZE,
    InferenceLayout,
    LayoutError,
    TrainingLayout,
    _norm_dim,
    dim_shard_boxes,
)

__all__ = ["PlanError", "RangeTable", "WeightPlan", "build_plan", "check_tiling", "CostModel"]


#: A range whose runs are shorter than this (bytes, at the destination) and land back to back
#: there goes through the sender's staging buffer even without a conversion: packing its runs
#: costs a local copy, and saves one network write per run (a column shard of a row-major
#: tensor arrives row by row).
PACK_ROWS_BELOW = 64 << 10


_COLUMNS: Tuple[Tuple[str, type], ...] = (
    ("param", np.int32),
    ("src_rank", np.int32),
    ("src_buf", np.int32),
    ("src_off", np.int64),
    ("dst_rank", np.int32),
    ("dst_off", np.int64),
    ("length", np.int64),
    ("count", np.int64),
    ("src_stride", np.int64),
    ("dst_stride", np.int64),
)


@dataclass
class RangeTable:
    """Columnar table of strided ranges (one numpy array per column).

    Row ``i``: for ``k in range(count[i])``, elements ``[src_off + k*src_stride, + length)`` of
    buffer ``src_buf`` on training rank ``src_rank`` go to ``[dst_off + k*dst_stride, + length)``
    of parameter ``param``'s shard on inference rank ``dst_rank``. When ``count == 1`` the
    strides equal ``length``. Sorted by ``(src_rank, dst_rank, param, dst_off)``;
    :meth:`pairs` indexes the rows of each (source, destination) pair.
    """

    param: np.ndarray
    src_rank: np.ndarray
    src_buf: np.ndarray
    src_off: np.ndarray
    dst_rank: np.ndarray
    dst_off: np.ndarray
    length: np.ndarray
    count: np.ndarray
    src_stride: np.ndarray
    dst_stride: np.ndarray

    @classmethod
    def empty(cls) -> RangeTable:
        """A table with no rows."""
        return cls(**{n: np.zeros(0, dtype=t) for n, t in _COLUMNS})

    @classmethod
    def concat(cls, parts: Sequence[Dict[str, np.ndarray]]) -> RangeTable:
        """Concatenates column dicts and sorts."""
        if not parts:
            return cls.empty()
        cols: Dict[str, np.ndarray] = {
            n: np.concatenate([p[n] for p in parts]).astype(t, copy=False) for n, t in _COLUMNS
        }
        order = np.lexsort((cols["dst_off"], cols["param"], cols["dst_rank"], cols["src_rank"]))
        return cls(**{n: c[order] for n, c in cols.items()})

    def columns(self) -> Dict[str, np.ndarray]:
        """Column name -> array."""
        return {n: getattr(self, n) for n, _ in _COLUMNS}

    def __len__(self) -> int:
        return int(self.param.size)

    def take(self, idx: Any) -> RangeTable:
        """Rows ``idx`` (a mask, an index array or a slice), order kept."""
        return RangeTable(**{n: c[idx] for n, c in self.columns().items()})

    @property
    def elements(self) -> np.ndarray:
        """Elements each row moves (``length * count``)."""
        return self.length * self.count

    @property
    def nbytes(self) -> int:
        """Memory the table occupies."""
        return sum(c.nbytes for c in self.columns().values())

    def pairs(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst, starts)``: each (source, destination) pair with rows, and row offsets
        (``starts`` has one more entry than pairs)."""
        n = len(self)
        if n == 0:
            z = np.zeros(0, np.int32)
            return z, z, np.zeros(1, np.int64)
        brk = np.flatnonzero(
            (self.src_rank[1:] != self.src_rank[:-1]) | (self.dst_rank[1:] != self.dst_rank[:-1])
        )
        starts = np.concatenate(([0], brk + 1, [n])).astype(np.int64)
        return self.src_rank[starts[:-1]], self.dst_rank[starts[:-1]], starts

    def for_src(self, src: int) -> RangeTable:
        """Rows sent by training rank ``src`` (a contiguous slice)."""
        a, b = np.searchsorted(self.src_rank, [src, src + 1])
        return self.take(slice(int(a), int(b)))

    def for_dst(self, dst: int) -> RangeTable:
        """Rows received by inference rank ``dst``."""
        return self.take(self.dst_rank == dst)


@dataclass
class WeightPlan:
    """A static routing plan from a :class:`TrainingLayout` to an :class:`InferenceLayout`.

    ``data`` routes the parameters, ``scales`` the fp8 tile scales (see the module docstring);
    ``shared_*`` list the tiles of fp8 parameters whose elements come from several training ranks
    (``shared_param[i]``, ``shared_tile[i]``: parameter and row-major tile index; its
    contributing ranks are ``shared_ranks[shared_ptr[i]:shared_ptr[i+1]]``).
    """

    train: TrainingLayout
    infer: InferenceLayout
    data: RangeTable
    scales: RangeTable
    shared_param: np.ndarray
    shared_tile: np.ndarray
    shared_ptr: np.ndarray
    shared_ranks: np.ndarray
    shape_classes: int = 0
    build_seconds: float = 0.0
    _cache: Dict[str, Any] = field(default_factory=dict, repr=False)

    # -- questions the executor asks --

    def dst_params(self, dst: int) -> List[int]:
        """Parameters (indices, in parameter order) inference rank ``dst`` holds."""
        table = self._cache.get("dst_params")
        if table is None:
            tab: Dict[int, List[int]] = {}
            for i, p in enumerate(self.infer.params):
                for pl in self.infer.placements[p.name]:
                    for r in pl.ranks:
                        tab.setdefault(r, []).append(i)
            self._cache["dst_params"] = table = tab
        return list(table.get(dst, []))

    def senders_of(self, dst: int) -> List[int]:
        """Training ranks that write to inference rank ``dst``, ascending."""
        s = np.concatenate(
            [
                self.data.src_rank[self.data.dst_rank == dst],
                self.scales.src_rank[self.scales.dst_rank == dst],
            ]
        )
        return [int(x) for x in np.unique(s)]

    def receivers_of(self, src: int) -> List[int]:
        """Inference ranks training rank ``src`` writes to, ascending."""
        d = np.concatenate([self.data.for_src(src).dst_rank, self.scales.for_src(src).dst_rank])
        return [int(x) for x in np.unique(d)]

    def shared_for(self, rank: int) -> Tuple[np.ndarray, np.ndarray, List[np.ndarray]]:
        """Shared tiles training rank ``rank`` contributes to: ``(param, tile, peers)``, where
        ``peers[i]`` are the other contributors of tile ``i``."""
        mask = np.zeros(self.shared_param.size, dtype=bool)
        owner = np.repeat(np.arange(self.shared_param.size), np.diff(self.shared_ptr))
        mask[owner[self.shared_ranks == rank]] = True
        idx = np.flatnonzero(mask)
        peers = [
            r[r != rank]
            for r in (self.shared_ranks[self.shared_ptr[i] : self.shared_ptr[i + 1]] for i in idx)
        ]
        return self.shared_param[idx], self.shared_tile[idx], peers

    def fingerprint(self) -> str:
        """sha256 over every table: both sides of a transfer check they hold the same plan."""
        fp = self._cache.get("fingerprint")
        if fp is None:
            h = hashlib.sha256()
            for t in (self.data, self.scales):
                for c in t.columns().values():
                    h.update(np.ascontiguousarray(c).tobytes())
            for a in (self.shared_param, self.shared_tile, self.shared_ptr, self.shared_ranks):
                h.update(np.ascontiguousarray(a).tobytes())
            h.update(repr([(p.name, p.shape, p.dtype) for p in self.train.params]).encode())
            h.update(repr(sorted(self.infer.dtypes.items())).encode())
            h.update(repr(self.infer.block).encode())
            self._cache["fingerprint"] = fp = h.hexdigest()
        return str(fp)

    # -- size and traffic --

    def bytes_per_pair(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(src, dst, bytes)`` on the wire per (training, inference) pair, scales included."""
        isz = np.array([ITEMSIZE[self.infer.dtype(p.name)] for p in self.infer.params])
        src = np.concatenate([self.data.src_rank, self.scales.src_rank]).astype(np.int64)
        dst = np.concatenate([self.data.dst_rank, self.scales.dst_rank]).astype(np.int64)
        b = np.concatenate([self.data.elements * isz[self.data.param], self.scales.elements * 4])
        key = src * self.infer.world + dst
        uk, inv = np.unique(key, return_inverse=True)
        tot = np.bincount(inv, weights=b).astype(np.int64)
        return uk // self.infer.world, uk % self.infer.world, tot

    def summary(self) -> Dict[str, object]:
        """Counts and sizes (JSON-friendly)."""
        s, d, b = self.bytes_per_pair()
        return {
            "params": len(self.train.params),
            "training_ranks": self.train.world,
            "inference_ranks": self.infer.world,
            "shape_classes": self.shape_classes,
            "data_ranges": len(self.data),
            "scale_ranges": len(self.scales),
            "shared_tiles": int(self.shared_param.size),
            "pairs": int(s.size),
            "plan_bytes": self.data.nbytes
            + self.scales.nbytes
            + int(
                self.shared_param.nbytes
                + self.shared_tile.nbytes
                + self.shared_ptr.nbytes
                + self.shared_ranks.nbytes
            ),
            "wire_bytes": int(b.sum()),
            "build_seconds": round(self.build_seconds, 3),
        }

    # -- verification --

    def verify(self, ranks_per_pass: int = 0) -> None:
        """Exact check, by expansion: every element of every inference shard (and every tile
        scale) is written exactly once, and every source run lies inside its buffer.

        Memory grows with the number of runs (``sum(count)``) checked at once;
        ``ranks_per_pass > 0`` checks that many inference ranks at a time (the 1T plan has about
        1e8 runs). :func:`build_plan` with ``verify=True`` is the cheaper per-shape-class proof.
        """
        infer = self.infer
        npar = len(infer.params)
        keys: List[int] = []
        sizes: List[int] = []
        skeys: List[int] = []
        ssizes: List[int] = []
        for i, p in enumerate(infer.params):
            fp8 = infer.is_fp8(p.name)
            bl = np.asarray(infer.block, dtype=np.int64)
            for pl in infer.placements[p.name]:
                d = _norm_dim(pl.dim, len(p.shape), p.name)
                lo, hi = dim_shard_boxes(p.shape, d, len(pl.ranks))
                n = np.prod(hi - lo, axis=1)
                g = np.prod(-(-hi // bl) - lo // bl, axis=1) if fp8 else n
                for k, r in enumerate(pl.ranks):
                    if n[k] == 0:  # more ranks than rows: an empty shard receives nothing
                        continue
                    keys.append(r * npar + i)
                    sizes.append(int(n[k]))
                    if fp8:
                        skeys.append(r * npar + i)
                        ssizes.append(int(g[k]))
        per = ranks_per_pass if ranks_per_pass > 0 else infer.world
        for what, table, ek, es in (
            ("data", self.data, np.asarray(keys, np.int64), np.asarray(sizes, np.int64)),
            ("scales", self.scales, np.asarray(skeys, np.int64), np.asarray(ssizes, np.int64)),
        ):
            tk = table.dst_rank.astype(np.int64) * npar + table.param
            order = np.argsort(tk, kind="stable")
            tks = tk[order]
            for r0 in range(0, infer.world, per):
                a, b = np.searchsorted(tks, [r0 * npar, (r0 + per) * npar])
                rows = order[a:b]
                m = (ek >= r0 * npar) & (ek < (r0 + per) * npar)
                check_tiling(
                    what,
                    tk[rows],
                    table.dst_off[rows],
                    table.length[rows],
                    table.count[rows],
                    table.dst_stride[rows],
                    ek[m],
                    es[m],
                )
        # sources inside their buffers
        nb = len(self.train.buffer_names)
        size = np.full(self.train.world * nb, -1, dtype=np.int64)
        for (r, b), n in self.train.buffer_sizes().items():
            size[r * nb + b] = n
        t = self.data
        cap = size[t.src_rank.astype(np.int64) * nb + t.src_buf]
        last = t.src_off + (t.count - 1) * t.src_stride + t.length
        bad = np.flatnonzero((cap < 0) | (t.src_off < 0) | (last > cap))
        if bad.size:
            i = bad[0]
            raise PlanError(
                f"source run [{t.src_off[i]}, {last[i]}) outside buffer {t.src_buf[i]} of rank "
                f"{t.src_rank[i]} ({cap[i]} elements)"
            )


def check_tiling(
    what: str,
    keys: np.ndarray,
    off: np.ndarray,
    length: np.ndarray,
    count: np.ndarray,
    stride: np.ndarray,
    expect_keys: np.ndarray,
    expect_sizes: np.ndarray,
) -> None:
    """Raises :class:`PlanError` unless, for every key, the runs tile ``[0, size)`` exactly once.

    ``keys[i]`` names the destination of strided range ``i`` (runs at ``off + k * stride``,
    ``k < count``); ``expect_keys`` / ``expect_sizes`` list every destination that must be
    covered. Keys with ranges but not expected are an error too.
    """
    count = count.astype(np.int64)
    row = np.repeat(np.arange(keys.size), count)
    k = np.arange(row.size, dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
    start = off[row] + k * stride[row]
    ln = length[row]
    kk = keys[row]
    order = np.lexsort((start, kk))
    start, ln, kk = start[order], ln[order], kk[order]
    ek = np.asarray(expect_keys, dtype=np.int64)
    es = np.asarray(expect_sizes, dtype=np.int64)
    eo = np.argsort(ek)
    ek, es = ek[eo], es[eo]
    uk, first = np.unique(kk, return_index=True)
    if not np.array_equal(uk, ek):
        missing = np.setdiff1d(ek, uk)
        extra = np.setdiff1d(uk, ek)
        raise PlanError(f"{what}: destinations missing {missing[:5]} / unexpected {extra[:5]}")
    if kk.size == 0:
        return
    if np.any(ln <= 0):
        raise PlanError(f"{what}: empty run")
    same = kk[1:] == kk[:-1]
    gap = start[1:] != start[:-1] + ln[:-1]
    bad = np.flatnonzero(same & gap)
    if bad.size:
        i = bad[0]
        kind = "overlap" if start[i + 1] < start[i] + ln[i] else "hole"
        raise PlanError(f"{what}: {kind} in destination key {kk[i]} at element {start[i] + ln[i]}")
    if np.any(start[first] != 0):
        i = int(np.flatnonzero(start[first] != 0)[0])
        raise PlanError(f"{what}: destination key {uk[i]} starts at {start[first][i]}, not 0")
    last = np.concatenate((first[1:], [kk.size])) - 1
    end = start[last] + ln[last]
    if np.any(end != es):
        i = int(np.flatnonzero(end != es)[0])
        raise PlanError(f"{what}: destination key {uk[i]} ends at {end[i]}, size {es[i]}")


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# one shape class
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# the planner
# ------------------------------------------------------------------------------------------------


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


def iter_runs(table: RangeTable, rows: Optional[np.ndarray] = None) -> Iterator[Tuple[int, ...]]:
    """Every row as a Python tuple (debugging aid)."""
    idx = range(len(table)) if rows is None else rows
    cols = table.columns()
    for i in idx:
        yield tuple(int(cols[n][i]) for n, _ in _COLUMNS)


# ------------------------------------------------------------------------------------------------
# cost model
# ------------------------------------------------------------------------------------------------


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
