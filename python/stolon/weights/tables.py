"""What a routing plan is: strided range tables, :class:`WeightPlan` and their exact checks.

:mod:`.plan` builds these from two layouts (its docstring says what a strided range is); the
executor (:mod:`.program`, :mod:`.sender`) and the cost model (:mod:`.cost`) only read them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PlanError
from .layout import ITEMSIZE, InferenceLayout, TrainingLayout, _norm_dim, dim_shard_boxes

__all__ = ["PACK_ROWS_BELOW", "RangeTable", "WeightPlan", "check_tiling", "iter_runs"]


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

    ``data`` routes the parameters, ``scales`` the fp8 tile scales (see :mod:`.plan`);
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


def iter_runs(table: RangeTable, rows: Optional[np.ndarray] = None) -> Iterator[Tuple[int, ...]]:
    """Every row as a Python tuple (debugging aid)."""
    idx = range(len(table)) if rows is None else rows
    cols = table.columns()
    for i in idx:
        yield tuple(int(cols[n][i]) for n, _ in _COLUMNS)
