"""A training rank's static program: what it writes on every update, derived once from the plan.

:class:`_Program` holds the rank's buffers, staging ring, tile maxima and scales as numpy arrays
and turns its rows of the plan into write requests: direct from the parameter buffers where no
conversion is needed, otherwise gathered (and converted) into a ring of staging buffers.
:class:`.gpu.TorchProgram` is the same program with its memory on a torch device;
:class:`.sender.WeightSender` submits the requests to an engine, :func:`.simulation.simulate`
copies them in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import WeightTransferError
from .convert import amax_by_block, grid_shape, quantize, scale_from_amax
from .layout import ITEMSIZE, numpy_dtype
from .slots import _align, slot_layout
from .tables import PACK_ROWS_BELOW, WeightPlan

# A write request, relative to the destination slot's start:
#   ("scatter", src, [(dst, src_byte_off, dst_byte_off, nbytes), ...])
#   ("paged", src, dst, page_bytes, count, src_byte_off, src_byte_stride, dst_byte_off,
#    dst_byte_stride)
# src is ("buf", i), ("staging",), ("scales",) or ("stamp",).
_Request = Tuple[Any, ...]


@dataclass
class _Batch:
    ring: int  # staging buffer, -1 for direct writes
    fills: List[Tuple[int, ...]]  # staged pieces to gather/convert before writing
    requests: List[_Request]


class _Program:
    """What one training rank does on every update, derived once from the plan."""

    def __init__(
        self,
        plan: WeightPlan,
        rank: int,
        buffers: Mapping[str, np.ndarray],
        *,
        staging_bytes: int,
        depth: int,
        host_copy: bool,
        max_items: int = 256,
    ) -> None:
        if staging_bytes < 64 or depth < 1:
            raise ValueError("staging_bytes must be >= 64 and depth >= 1")
        self.plan = plan
        self.rank = rank
        train = plan.train
        need = train.buffers(rank)
        self.buf_names = sorted(need)
        self.buf_local = {train.buffer_ids[n]: i for i, n in enumerate(self.buf_names)}
        self.arrays: List[Any] = self._load_buffers(buffers, need)
        self.staging_bytes = staging_bytes
        self.depth = depth
        self._build(plan, rank, staging_bytes, depth, host_copy, max_items)

    def _load_buffers(self, buffers: Mapping[str, Any], need: Mapping[str, Any]) -> List[Any]:
        """This rank's buffers as flat arrays of their dtype (checked against the layout)."""
        out: List[Any] = []
        for bname in self.buf_names:
            if bname not in buffers:
                raise WeightTransferError(f"training rank {self.rank}: buffer {bname!r} not given")
            a = np.asarray(buffers[bname])
            numel, dt = need[bname]
            dty = numpy_dtype(dt)
            if not a.flags.c_contiguous or a.nbytes < numel * dty.itemsize:
                raise WeightTransferError(
                    f"buffer {bname!r}: needs {numel} contiguous {dt} elements, "
                    f"got {a.dtype} {a.shape}"
                )
            out.append(a.reshape(-1).view(np.uint8)[: numel * dty.itemsize].view(dty))
        return out

    def _alloc(self, scales: int, staging: int) -> None:
        """The scale, tile-maxima, stamp and staging memory (numpy, host)."""
        self.scale_out = np.ones(max(scales, 1), dtype=np.float32)  # registered: scales go out
        self.amax = {p: np.zeros(g[0] * g[1], np.float32) for p, g in self.fp8.items()}
        self.stamp = np.zeros(1, dtype=np.uint64)
        self.staging = np.zeros(staging, dtype=np.uint8)

    def sync(self) -> None:
        """Waits until what was filled is in memory (a no-op on the host)."""

    def _build(
        self,
        plan: WeightPlan,
        rank: int,
        staging_bytes: int,
        depth: int,
        host_copy: bool,
        max_items: int,
    ) -> None:
        train, infer = plan.train, plan.infer
        data = plan.data.for_src(rank)
        scales = plan.scales.for_src(rank)
        self.receivers = plan.receivers_of(rank)
        self.layouts = {d: slot_layout(plan, d) for d in self.receivers}
        self.block = infer.block

        # fp8 parameters this rank converts: tile grids
        self.fp8: Dict[int, Tuple[int, int]] = {}
        for p in np.unique(data.param):
            name = infer.params[int(p)].name
            if infer.is_fp8(name):
                self.fp8[int(p)] = grid_shape(infer.params[int(p)].shape, self.block)
        self.scale_off: Dict[int, int] = {}
        n = 0
        for p, g in self.fp8.items():
            self.scale_off[p] = n
            n += g[0] * g[1]
        self._alloc(n, staging_bytes * depth)

        # the rows of every fp8 parameter (for the amax pass)
        self.rows_by_param: Dict[int, List[Tuple[int, ...]]] = {}
        # --- pieces and batches ---
        self.batches: List[_Batch] = []
        direct: List[_Request] = []
        ring, fill_off = 0, 0
        cur: Optional[_Batch] = None
        # destinations in rotated order (rank r starts with inference rank r mod world), so the
        # senders do not all start on the same receiver
        rot = (data.dst_rank.astype(np.int64) - rank) % infer.world
        for i in np.lexsort((data.dst_off, data.param, rot)):
            p = int(data.param[i])
            pname = infer.params[p].name
            s_dt = train.params[p].dtype
            d_dt = infer.dtype(pname)
            isz_s, isz_d = ITEMSIZE[s_dt], ITEMSIZE[d_dt]
            d = int(data.dst_rank[i])
            entry = self.layouts[d].entry(p)
            row = (
                p,
                self.buf_local[int(data.src_buf[i])],
                int(data.src_off[i]),
                int(data.length[i]),
                int(data.count[i]),
                int(data.src_stride[i]),
                d,
                int(data.dst_off[i]),
                int(data.dst_stride[i]),
            )
            if p in self.fp8:
                self.rows_by_param.setdefault(p, []).append(row)
            _, lb, so, ln, cnt, sst, _, do, dst = row
            # short runs that land back to back go through staging to be packed (one write)
            pack = cnt > 1 and dst == ln and ln * isz_d < PACK_ROWS_BELOW
            if not host_copy and s_dt == d_dt and not pack:
                if cnt == 1:
                    direct.append(
                        (
                            "scatter",
                            ("buf", lb),
                            [(d, so * isz_s, entry.offset + do * isz_d, ln * isz_d)],
                        )
                    )
                else:
                    direct.append(
                        (
                            "paged",
                            ("buf", lb),
                            d,
                            ln * isz_d,
                            cnt,
                            so * isz_s,
                            sst * isz_s,
                            entry.offset + do * isz_d,
                            dst * isz_d,
                        )
                    )
                continue
            for piece in _split(row, staging_bytes // isz_d):
                _, lb, so, ln, cnt, sst, _, do, dst = piece
                nbytes = ln * cnt * isz_d
                if cur is None or fill_off + nbytes > staging_bytes:
                    if cur is not None:
                        ring = (ring + 1) % depth
                    cur = _Batch(ring, [], [])
                    self.batches.append(cur)
                    fill_off = 0
                sbase = ring * staging_bytes + fill_off
                cur.fills.append(piece + (sbase,))
                # Staging packs the runs back to back; where the destination does too (a
                # column shard stored as its own row-major block), they go as one write.
                if cnt == 1 or dst == ln:
                    cur.requests.append(
                        ("scatter", ("staging",), [(d, sbase, entry.offset + do * isz_d, nbytes)])
                    )
                else:
                    cur.requests.append(
                        (
                            "paged",
                            ("staging",),
                            d,
                            ln * isz_d,
                            cnt,
                            sbase,
                            ln * isz_d,
                            entry.offset + do * isz_d,
                            dst * isz_d,
                        )
                    )
                fill_off = _align(fill_off + nbytes, 16)
        for k in range(0, len(direct), max_items):
            self.batches.append(_Batch(-1, [], _merge_scatters(direct[k : k + max_items])))
        for b in self.batches:
            b.requests = _merge_scatters(b.requests)

        # --- scale writes (after the amax exchange), then stamps ---
        reqs: List[_Request] = []
        for i in range(len(scales)):
            p = int(scales.param[i])
            d = int(scales.dst_rank[i])
            e = self.layouts[d].entry(p)
            so = 4 * (self.scale_off[p] + int(scales.src_off[i]))
            do = e.scale_offset + 4 * int(scales.dst_off[i])
            ln, cnt = 4 * int(scales.length[i]), int(scales.count[i])
            if cnt == 1:
                reqs.append(("scatter", ("scales",), [(d, so, do, ln)]))
            else:
                reqs.append(
                    (
                        "paged",
                        ("scales",),
                        d,
                        ln,
                        cnt,
                        so,
                        4 * int(scales.src_stride[i]),
                        do,
                        4 * int(scales.dst_stride[i]),
                    )
                )
        self.scale_requests = _merge_scatters(reqs)
        self.stamp_requests: List[_Request] = (
            [
                (
                    "scatter",
                    ("stamp",),
                    [(d, 0, 8 * self.layouts[d].senders.index(rank), 8) for d in self.receivers],
                )
            ]
            if self.receivers
            else []
        )

        # --- shared tiles: per peer, (param, tile) in plan order ---
        sp, st, peers = plan.shared_for(rank)
        per_peer: Dict[int, List[int]] = {}
        for i, ps in enumerate(peers):
            for q in ps:
                per_peer.setdefault(int(q), []).append(i)
        self.peers = sorted(per_peer)
        self.peer_tiles: Dict[int, Tuple[np.ndarray, np.ndarray]] = {
            q: (sp[per_peer[q]].astype(np.int64), st[per_peer[q]]) for q in self.peers
        }
        self.inbox_off: Dict[int, int] = {}
        n = 0
        for q in self.peers:
            self.inbox_off[q] = n
            n += len(per_peer[q])
        self.inbox_total = n
        self.inbox = np.zeros(max(2 * n, 1), dtype=np.float32)  # two parities
        self.outbox = np.zeros(max(n, 1), dtype=np.float32)

    # -- per update --

    def _view(self, lb: int, so: int, ln: int, cnt: int, sst: int) -> np.ndarray:
        a = self.arrays[lb]
        return np.lib.stride_tricks.as_strided(
            a[so:], shape=(cnt, ln), strides=(sst * a.itemsize, a.itemsize), writeable=False
        )

    def _tiles(self, p: int, d: int, do: int, ln: int, cnt: int, dst: int) -> np.ndarray:
        """Tile index of each element of a destination range."""
        e = self.layouts[d].entry(p)
        idx = do + np.arange(cnt, dtype=np.int64)[:, None] * dst + np.arange(ln, dtype=np.int64)
        r, c = np.divmod(idx, e.shape[1])
        gcols = self.fp8[p][1]
        return ((r + e.lo[0]) // self.block[0]) * gcols + (c + e.lo[1]) // self.block[1]

    def local_amax(self) -> None:
        """Per tile, ``max |x|`` over the elements this rank sends."""
        for p, rows in self.rows_by_param.items():
            g = self.amax[p]
            g[:] = 0
            for _, lb, so, ln, cnt, sst, d, do, dst in rows:
                amax_by_block(
                    self._view(lb, so, ln, cnt, sst), self._tiles(p, d, do, ln, cnt, dst), g
                )

    def partials(self, peer: int) -> np.ndarray:
        """This rank's partial maxima for the tiles it shares with ``peer`` (plan order)."""
        params, tiles = self.peer_tiles[peer]
        out = np.empty(params.size, dtype=np.float32)
        for p in np.unique(params):
            m = params == p
            out[m] = self.amax[int(p)][tiles[m]]
        return out

    def merge(self, peer: int, values: np.ndarray) -> None:
        """Folds ``peer``'s partial maxima into this rank's tile maxima."""
        params, tiles = self.peer_tiles[peer]
        for p in np.unique(params):
            m = params == p
            np.maximum.at(self.amax[int(p)], tiles[m], values[m])

    def finish_scales(self) -> None:
        """Tile maxima -> scales (into the registered scale buffer)."""
        for p, off in self.scale_off.items():
            g = self.amax[p]
            self.scale_out[off : off + g.size] = scale_from_amax(g)

    def fill(self, batch: _Batch) -> None:
        """Gathers (and converts) a batch's staged pieces into its staging buffer."""
        infer = self.plan.infer
        for p, lb, so, ln, cnt, sst, d, do, dst, sbase in batch.fills:
            src = self._view(lb, so, ln, cnt, sst)
            name = infer.params[p].name
            d_dt = infer.dtype(name)
            n = ln * cnt * ITEMSIZE[d_dt]
            out = self.staging[sbase : sbase + n]
            if p in self.fp8:
                off = self.scale_off[p]
                sc = self.scale_out[off + self._tiles(p, d, do, ln, cnt, dst)]
                out[:] = quantize(src, sc).view(np.uint8).reshape(-1)
            elif d_dt == self.plan.train.params[p].dtype:
                out.view(src.dtype)[:] = src.reshape(-1)
            else:
                out.view(numpy_dtype(d_dt))[:] = src.astype(numpy_dtype(d_dt)).reshape(-1)

    def source(self, key: Tuple[Any, ...]) -> np.ndarray:
        """The uint8 bytes behind a request's source key."""
        if key[0] == "buf":
            return self.arrays[key[1]].view(np.uint8)
        return {
            "staging": self.staging,
            "scales": self.scale_out.view(np.uint8),
            "stamp": self.stamp.view(np.uint8),
        }[key[0]]


def _split(row: Tuple[int, ...], cap: int) -> List[Tuple[int, ...]]:
    """Cuts a range into pieces of at most ``cap`` destination elements."""
    p, lb, so, ln, cnt, sst, d, do, dst = row
    if ln * cnt <= cap:
        return [row]
    out: List[Tuple[int, ...]] = []
    if ln <= cap:
        per = cap // ln
        for k in range(0, cnt, per):
            c = min(per, cnt - k)
            out.append(
                (
                    p,
                    lb,
                    so + k * sst,
                    ln,
                    c,
                    sst if c > 1 else ln,
                    d,
                    do + k * dst,
                    dst if c > 1 else ln,
                )
            )
        return out
    for k in range(cnt):
        for a in range(0, ln, cap):
            n = min(cap, ln - a)
            out.append((p, lb, so + k * sst + a, n, 1, n, d, do + k * dst + a, n))
    return out


def _merge_scatters(reqs: List[_Request]) -> List[_Request]:
    """Joins scatter requests of one source to one destination into one request, placed where
    the first of them was (order of other requests kept). Destinations stay apart so the
    rotated destination order survives: with several senders, each receiver then has about
    one sender at a time (on 4 H100s, 2 training -> 2 inference ranks ran at 0.60 of the peer
    copy with every scatter spanning both receivers)."""
    out: List[_Request] = []
    where: Dict[Tuple[Any, ...], int] = {}
    for r in reqs:
        if r[0] == "scatter":
            k = (r[1], r[2][0][0] if r[2] else -1)
            if k in where:
                out[where[k]][2].extend(r[2])
                continue
            where[k] = len(out)
            out.append(("scatter", r[1], list(r[2])))
        else:
            out.append(r)
    return out
