"""Executing a plan on every update: training ranks write, inference ranks wait (CPU path).

Roles
-----
- :class:`WeightReceiver` (one per inference rank) registers one region holding **two slots**
  (or one, ``slots=1``); update ``v`` lands in slot ``v % slots``. It learns that ``v`` has
  fully landed by waiting for an exact count of immediate ``DATA(v)`` (the sum of what each
  training rank promised at connect time), checks a per-sender version stamp, and hands out
  read-only views. When it stops reading a version it calls :meth:`WeightReceiver.release`, a
  zero-byte write with immediate ``RELEASE(v)`` to each of its senders. It runs no collective
  and never writes weights.
- :class:`WeightSender` (one per training rank) executes its share of the plan: for fp8
  parameters it first agrees on tile scales with the training peers that share tiles (partial
  ``max |x|`` written one-sidedly into their ``amax`` inbox, counted with ``AMAX(v)``), then
  waits until every receiver released ``v - slots`` (so the slot of ``v`` is free), then
  streams the plan's ranges: directly from its registered parameter buffers when no conversion
  is needed, otherwise through a ring of ``depth`` staging buffers of ``staging_bytes`` each
  (gather, optionally convert, write; a buffer is refilled only after its writes completed,
  which bounds memory), writes its tile scales and finally its version stamps. Every write of
  update ``v`` carries ``DATA(v)``.

Nothing depends on the order in which writes land: the receiver counts immediates. Descriptors,
addresses and counts are exchanged as bytes (:meth:`info`, :meth:`connect`, :meth:`accept`)
over any channel.

:func:`simulate` runs the same per-rank programs with memory copies instead of an engine (for
tests and for checking a plan in one process).
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import WeightTransferError
from .convert import amax_by_block, grid_shape, quantize, scale_from_amax
from .layout import ITEMSIZE, numpy_dtype
from .plan import PACK_ROWS_BELOW, WeightPlan

__all__ = [
    "IMM_DATA",
    "IMM_AMAX",
    "IMM_RELEASE",
    "imm_for",
    "WeightTransferError",
    "ShardEntry",
    "SlotLayout",
    "slot_layout",
    "WeightSnapshot",
    "WeightReceiver",
    "WeightSender",
    "simulate",
    "unpack_slot",
]

#: Immediate kinds (top 4 bits); the low 28 bits carry the update version.
IMM_DATA = 0xA
IMM_AMAX = 0xB
IMM_RELEASE = 0xC
_VERSION_MASK = (1 << 28) - 1
_ALIGN = 64


def imm_for(kind: int, version: int) -> int:
    """The 32-bit immediate of ``kind`` for update ``version``."""
    return (kind << 28) | (version & _VERSION_MASK)


def _align(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


# ------------------------------------------------------------------------------------------------
# the inference rank's memory map
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEntry:
    """One parameter shard in an inference slot."""

    param: int
    name: str
    shape: Tuple[int, ...]  # shard shape
    dtype: str
    offset: int  # bytes from the slot start
    nbytes: int
    lo: Tuple[int, ...]  # shard's first element in tensor coordinates
    scale_offset: int = -1  # fp8: float32 tile scales, row-major
    scale_shape: Tuple[int, int] = (0, 0)
    scale_lo: Tuple[int, int] = (0, 0)  # first tile in the tensor's tile grid


@dataclass(frozen=True)
class SlotLayout:
    """Memory map of one slot of an inference rank: a header of ``uint64`` version stamps (one
    per sender, in ``senders`` order), then each shard (and its scales) 64-byte aligned."""

    rank: int
    senders: Tuple[int, ...]
    entries: Tuple[ShardEntry, ...]
    slot_bytes: int

    def entry(self, param: int) -> ShardEntry:
        """The shard of parameter index ``param``."""
        for e in self.entries:
            if e.param == param:
                return e
        raise KeyError(param)

    @property
    def by_param(self) -> Dict[int, ShardEntry]:
        """Parameter index -> entry."""
        return {e.param: e for e in self.entries}


def slot_layout(plan: WeightPlan, rank: int) -> SlotLayout:
    """The slot layout of inference rank ``rank`` (both sides compute it from the plan)."""
    infer = plan.infer
    senders = tuple(plan.senders_of(rank))
    off = _align(8 * len(senders))
    entries: List[ShardEntry] = []
    for i in plan.dst_params(rank):
        p = infer.params[i]
        box = infer.shard_box(p.name, rank)
        assert box is not None
        shape = tuple(int(x) for x in box[1] - box[0])
        dt = infer.dtype(p.name)
        nbytes = int(np.prod(shape)) * ITEMSIZE[dt]
        e = ShardEntry(i, p.name, shape, dt, off, nbytes, tuple(int(x) for x in box[0]))
        off = _align(off + nbytes)
        sbox = infer.scale_box(p.name, rank)
        if sbox is not None:
            sshape = (int(sbox[1][0] - sbox[0][0]), int(sbox[1][1] - sbox[0][1]))
            e = ShardEntry(
                i,
                p.name,
                shape,
                dt,
                e.offset,
                nbytes,
                e.lo,
                off,
                sshape,
                (int(sbox[0][0]), int(sbox[0][1])),
            )
            off = _align(off + 4 * sshape[0] * sshape[1])
        entries.append(e)
    return SlotLayout(rank, senders, tuple(entries), max(off, _ALIGN))


@dataclass
class WeightSnapshot:
    """One landed update on one inference rank: views into its slot (do not write to them);
    numpy arrays, or torch tensors for a GPU receiver."""

    version: int
    tensors: Dict[str, Any]
    scales: Dict[str, Any]


def unpack_slot(layout: SlotLayout, slot: np.ndarray, version: int = -1) -> WeightSnapshot:
    """Typed views of a slot's shards and scales (``slot`` is the slot's uint8 bytes)."""
    tensors: Dict[str, Any] = {}
    scales: Dict[str, Any] = {}
    if not isinstance(slot, np.ndarray):  # a torch tensor (GPU slots): torch dtypes
        from .gpu import torch_dtype

        dtype_of: Callable[[str], Any] = torch_dtype
        f32: Any = torch_dtype("float32")
    else:
        dtype_of, f32 = numpy_dtype, np.float32
    for e in layout.entries:
        raw = slot[e.offset : e.offset + e.nbytes]
        tensors[e.name] = raw.view(dtype_of(e.dtype)).reshape(e.shape)
        if e.scale_offset >= 0:
            n = 4 * e.scale_shape[0] * e.scale_shape[1]
            raw = slot[e.scale_offset : e.scale_offset + n]
            scales[e.name] = raw.view(f32).reshape(e.scale_shape)
    return WeightSnapshot(version, tensors, scales)


# ------------------------------------------------------------------------------------------------
# a training rank's static program
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# engine-backed roles
# ------------------------------------------------------------------------------------------------


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _dumps(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _loads(b: bytes) -> Dict[str, Any]:
    try:
        out = json.loads(bytes(b).decode())
    except ValueError as e:
        raise WeightTransferError(f"malformed weight-transfer message: {e}") from None
    if not isinstance(out, dict) or "kind" not in out:
        raise WeightTransferError("malformed weight-transfer message")
    return out


class WeightReceiver:
    """An inference rank: registers slots of parameter memory and waits for updates.

    ``info()`` goes to every training rank; the hellos the senders return go to
    :meth:`accept`. Then :meth:`wait` for each version, read, :meth:`release`.
    ``device="cuda:N"`` keeps the slots in GPU memory (snapshots are then torch tensors); once
    :meth:`wait` returns, every byte of the version is in that memory.

    ``slots=2`` (default): update ``v`` lands in slot ``v % 2`` while ``v - 1`` can still be
    read. ``slots=1`` halves the memory: update ``v`` lands where ``v - 1`` was, so the senders
    wait until ``v - 1`` was released, and a snapshot must not be read after its release (pause
    serving between releasing ``v - 1`` and waiting for ``v``).
    """

    def __init__(
        self,
        engine: Any,
        plan: WeightPlan,
        rank: int,
        *,
        timeout: float = 60.0,
        device: Optional[str] = None,
        slots: int = 2,
    ) -> None:
        if slots not in (1, 2):
            raise WeightTransferError(f"slots must be 1 or 2, got {slots}")
        self.engine = engine
        self.plan = plan
        self.rank = rank
        self.timeout = timeout
        self.layout = slot_layout(plan, rank)
        self.device = device
        self.slots = slots
        self.memory: Any
        total = slots * self.layout.slot_bytes
        if device is None:
            self.memory = np.zeros(total, dtype=np.uint8)
        else:  # torch memory on `device` ("cuda:N": GPU slots; the engine needs cuda_device)
            import torch

            self.memory = torch.zeros(total, dtype=torch.uint8, device=device)
        self.region = engine.register(self.memory)
        self._expected: Optional[int] = None
        self._senders: Dict[int, Any] = {}
        self._landed: set = set()
        # Typed views of each slot, made once: the slots never move, and building a view per
        # tensor on every update costs about 5 us each (half a millisecond for a hundred).
        self._views: Dict[int, WeightSnapshot] = {}
        #: When the last :meth:`wait` saw every write counted (``time.monotonic()``), and how
        #: long it then took to check the stamps and return.
        self.last_wait: Dict[str, float] = {}

    def info(self) -> bytes:
        """Bytes for the training ranks: address, slot descriptor, plan fingerprint."""
        return _dumps(
            {
                "kind": "infer",
                "rank": self.rank,
                "fingerprint": self.plan.fingerprint(),
                "address": _b64(self.engine.address.to_bytes()),
                "slots": _b64(self.region.descriptor.to_bytes()),
                "slot_bytes": self.layout.slot_bytes,
                "num_slots": self.slots,
            }
        )

    def accept(self, hellos: Sequence[bytes]) -> None:
        """Takes the senders' hellos (immediate counts per update); needs one from each sender."""
        from ..engine import Address

        counts: Dict[int, int] = {}
        for h in hellos:
            m = _loads(h)
            if m["kind"] != "hello" or m.get("role") != "infer" or m["dst"] != self.rank:
                continue
            if m["fingerprint"] != self.plan.fingerprint():
                raise WeightTransferError(f"rank {m['src']} holds a different plan")
            counts[int(m["src"])] = int(m["count"])
            self._senders[int(m["src"])] = Address.from_bytes(_unb64(m["address"]))
        if sorted(counts) != list(self.layout.senders):
            raise WeightTransferError(
                f"inference rank {self.rank}: hellos from {sorted(counts)}, "
                f"expected {list(self.layout.senders)}"
            )
        self._expected = sum(counts.values())

    @property
    def expected_imms(self) -> int:
        """Immediates one update brings (all senders together)."""
        if self._expected is None:
            raise WeightTransferError("accept() the senders' hellos first")
        return self._expected

    def slot(self, version: int) -> Any:
        """The bytes of the slot ``version`` lands in."""
        n = self.layout.slot_bytes
        k = version % self.slots
        return self.memory[k * n : (k + 1) * n]

    def ready(self, version: int) -> bool:
        """Whether all of ``version`` has landed (non-blocking)."""
        if version in self._landed:
            return True
        return self.engine.imm_count(imm_for(IMM_DATA, version)) >= self.expected_imms

    def wait(self, version: int, timeout: Optional[float] = None) -> WeightSnapshot:
        """Blocks until every write of ``version`` has landed, checks stamps, returns views.

        Raises ``stolon.TransferTimeoutError`` after ``timeout`` seconds.
        """
        if version not in self._landed:
            t = self.timeout if timeout is None else timeout
            self.engine.wait_imm(imm_for(IMM_DATA, version), self.expected_imms, t)
            self._landed.add(version)
            self._landed.discard(version - self.slots)
        counted = time.monotonic()
        slot = self.slot(version)
        raw = slot[: 8 * len(self.layout.senders)]
        if not isinstance(raw, np.ndarray):
            raw = raw.cpu().numpy()
        stamps = raw.view(np.uint64)
        if np.any(stamps != version):
            raise WeightTransferError(
                f"inference rank {self.rank}: update {version} counted but stamps are "
                f"{stamps.tolist()}"
            )
        k = version % self.slots
        views = self._views.get(k)
        if views is None:
            views = self._views[k] = unpack_slot(self.layout, slot, version)
        self.last_wait = {"counted_at": counted, "check_s": time.monotonic() - counted}
        return WeightSnapshot(version, dict(views.tensors), dict(views.scales))

    def release(self, version: int, timeout: Optional[float] = None) -> None:
        """Tells every sender that the slot of ``version`` may be overwritten (by ``version +
        slots``); with one slot, views of ``version`` must not be read after this."""
        t = self.timeout if timeout is None else timeout
        futs = [
            self.engine.write_imm(a, imm_for(IMM_RELEASE, version), timeout=t)
            for a in self._senders.values()
        ]
        for f in futs:
            f.wait(t)


class WeightSender:
    """A training rank: pushes its share of every update (see the module docstring).

    ``buffers`` maps the names of :meth:`TrainingLayout.buffers` to this rank's arrays (views
    of the live parameters; their contents are read during :meth:`push`). ``host_copy=True``
    gathers even unconverted parameters through the staging ring (the path a rank that keeps
    parameters in unregistered or offloaded memory takes).

    ``device`` ("cuda:N", or "cpu" for torch CPU tensors) takes torch tensors as ``buffers``:
    staging ring, scales and stamps then live on that device, gather, tile maxima and fp8
    conversion run as torch ops there (bit-identical to the numpy path), and buffers kept on
    another device (CPU-offloaded shards) are copied host-to-device in the pipeline.
    """

    def __init__(
        self,
        engine: Any,
        plan: WeightPlan,
        rank: int,
        buffers: Mapping[str, np.ndarray],
        *,
        staging_bytes: int = 4 << 20,
        depth: int = 4,
        host_copy: bool = False,
        timeout: float = 60.0,
        device: Optional[str] = None,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.rank = rank
        self.timeout = timeout
        self.prog: _Program
        if device is None:
            self.prog = _Program(
                plan, rank, buffers, staging_bytes=staging_bytes, depth=depth, host_copy=host_copy
            )
        else:
            from .gpu import TorchProgram

            self.prog = TorchProgram(
                plan, rank, buffers, staging_bytes=staging_bytes, depth=depth,
                host_copy=host_copy, device=device,
            )  # fmt: skip
        pr = self.prog
        self._regions: Dict[Tuple[Any, ...], Any] = {}
        keys: List[Tuple[Any, ...]] = [("staging",), ("scales",), ("stamp",)]
        keys += [("buf", i) for i in range(len(pr.arrays))]
        for k in keys:
            used = any(r[1] == k for b in pr.batches for r in b.requests) or k[0] != "buf"
            if used:
                self._regions[k] = engine.register(pr.source(k))
        self.inbox_region = engine.register(pr.inbox)
        self.outbox_region = engine.register(pr.outbox)
        self._dst: Dict[int, Tuple[Any, int]] = {}  # inference rank -> (descriptor, slot bytes)
        self._peer: Dict[int, Tuple[Any, int, int]] = {}  # training peer -> (desc, total, off)
        self._counts: Dict[int, int] = {}
        self._amax_expected: Optional[int] = None
        self._pushed: set = set()
        self._slots: Optional[int] = None  # slots of every receiver (they must agree)

    def info(self) -> bytes:
        """Bytes for peers: address, amax inbox and where each peer writes in it."""
        return _dumps(
            {
                "kind": "train",
                "rank": self.rank,
                "fingerprint": self.plan.fingerprint(),
                "address": _b64(self.engine.address.to_bytes()),
                "inbox": _b64(self.inbox_region.descriptor.to_bytes()),
                "inbox_total": self.prog.inbox_total,
                "inbox_off": {str(q): o for q, o in self.prog.inbox_off.items()},
            }
        )

    def connect(self, infos: Sequence[bytes]) -> Dict[Tuple[str, int], bytes]:
        """Takes the infos of (at least) this rank's receivers and tile-sharing peers; returns
        hellos keyed ``("infer", rank)`` / ``("train", rank)`` for those ranks to accept."""
        from ..engine import MemoryDescriptor

        pr = self.prog
        for b in infos:
            m = _loads(b)
            if m.get("fingerprint") != self.plan.fingerprint():
                raise WeightTransferError(f"{m.get('kind')} rank {m.get('rank')}: plan differs")
            r = int(m["rank"])
            if m["kind"] == "infer" and r in pr.layouts:
                if m["slot_bytes"] != pr.layouts[r].slot_bytes:
                    raise WeightTransferError(f"inference rank {r}: slot size differs")
                self._dst[r] = (MemoryDescriptor.from_bytes(_unb64(m["slots"])), m["slot_bytes"])
                k = int(m.get("num_slots", 2))
                if self._slots is not None and k != self._slots:
                    raise WeightTransferError(
                        f"inference rank {r} has {k} slots, another receiver {self._slots}: "
                        "every receiver of a plan must use the same number"
                    )
                self._slots = k
            elif m["kind"] == "train" and r in pr.peer_tiles:
                off = m["inbox_off"].get(str(self.rank))
                if off is None:
                    raise WeightTransferError(f"training rank {r} expects no tiles from us")
                self._peer[r] = (
                    MemoryDescriptor.from_bytes(_unb64(m["inbox"])),
                    int(m["inbox_total"]),
                    int(off),
                )
        missing = [d for d in pr.receivers if d not in self._dst]
        missing_p = [q for q in pr.peers if q not in self._peer]
        if missing or missing_p:
            raise WeightTransferError(f"no info from inference {missing} / training {missing_p}")
        # immediates per receiver, from this engine's sharding rules
        counts = {d: 0 for d in pr.receivers}
        all_reqs = [r for b in pr.batches for r in b.requests]
        eng = self.engine
        for req in all_reqs + pr.scale_requests + pr.stamp_requests:
            src = self._regions[req[1]]
            if req[0] == "scatter":
                # each item is cut by its destination's path (NVLink: one copy per item)
                for d, _, _, nbytes in req[2]:
                    counts[d] += eng.imm_count_for(src, self._dst[d][0], nbytes)
            else:  # one op per page on every path (more for pages over the path's op size)
                per = eng.imm_count_for(src, self._dst[req[2]][0], req[3], pin_domain=0)
                counts[req[2]] += req[4] * per
        self._counts = counts
        addr = _b64(self.engine.address.to_bytes())
        fp = self.plan.fingerprint()
        out: Dict[Tuple[str, int], bytes] = {}
        for d, c in counts.items():
            out[("infer", d)] = _dumps(
                {
                    "kind": "hello",
                    "role": "infer",
                    "src": self.rank,
                    "dst": d,
                    "count": c,
                    "fingerprint": fp,
                    "address": addr,
                }
            )
        for q in pr.peers:
            n = self.engine.imm_count_for(
                self.outbox_region, self._peer[q][0], 4 * pr.peer_tiles[q][0].size
            )
            out[("train", q)] = _dumps(
                {
                    "kind": "hello",
                    "role": "train",
                    "src": self.rank,
                    "dst": q,
                    "count": n,
                    "fingerprint": fp,
                    "address": addr,
                }
            )
        if not pr.peers:
            self._amax_expected = 0
        return out

    def accept(self, hellos: Sequence[bytes]) -> None:
        """Takes the hellos of tile-sharing training peers (amax immediates they will send)."""
        counts: Dict[int, int] = {}
        for h in hellos:
            m = _loads(h)
            if m["kind"] == "hello" and m.get("role") == "train" and m["dst"] == self.rank:
                counts[int(m["src"])] = int(m["count"])
        if sorted(counts) != self.prog.peers:
            raise WeightTransferError(
                f"training rank {self.rank}: amax hellos from {sorted(counts)}, "
                f"expected {self.prog.peers}"
            )
        self._amax_expected = sum(counts.values())

    def _submit(
        self, req: _Request, version: int, imm: int, t: float
    ) -> List[Tuple[Any, List[int]]]:
        par = version % (self._slots or 2)  # the slot this version lands in
        src = self._regions[req[1]]
        if req[0] == "scatter":
            items = []
            order: List[int] = []
            for d, so, do, n in req[2]:
                desc, sb = self._dst[d]
                items.append((desc, so, par * sb + do, n))
                if d not in order:
                    order.append(d)
            return [(self.engine.scatter(src, items, imm, timeout=t), order)]
        _, _, d, pb, cnt, so, sst, do, dst = req
        desc, sb = self._dst[d]
        pages = list(range(cnt))
        f = self.engine.write_paged(
            src,
            desc,
            pb,
            pages,
            pages,
            src_stride=sst,
            dst_stride=dst,
            src_offset=so,
            dst_offset=par * sb + do,
            imm=imm,
            timeout=t,
        )
        return [(f, [d])]

    def push(self, version: int, timeout: Optional[float] = None) -> Dict[str, float]:
        """Writes update ``version`` (versions go up by one per update). Returns phase timings.

        Blocks until every write completed locally; waits (up to ``timeout``) for the receivers'
        release of ``version - slots`` before touching the slot of ``version``.
        """
        if self._amax_expected is None:
            raise WeightTransferError("connect() and accept() first")
        t = self.timeout if timeout is None else timeout
        pr = self.prog
        eng = self.engine
        stats: Dict[str, float] = {}
        t0 = time.perf_counter()
        futs: List[Tuple[Any, List[int]]] = []
        # 1. tile maxima, exchanged with peers
        if pr.fp8:
            pr.local_amax()
            par = version % 2
            amax_futs = []
            for q in pr.peers:
                vals = pr.partials(q)
                o = pr.inbox_off[q]
                pr.outbox[o : o + vals.size] = vals
                desc, total, off = self._peer[q]
                amax_futs.append(
                    eng.write(
                        self.outbox_region,
                        4 * o,
                        desc,
                        4 * (par * total + off),
                        4 * vals.size,
                        imm_for(IMM_AMAX, version),
                        timeout=t,
                    )
                )
            if self._amax_expected:
                eng.wait_imm(imm_for(IMM_AMAX, version), self._amax_expected, t)
            inbox = pr.inbox[par * pr.inbox_total : (par + 1) * pr.inbox_total]
            for q in pr.peers:
                o = pr.inbox_off[q]
                pr.merge(q, inbox[o : o + pr.peer_tiles[q][0].size])
            for f in amax_futs:
                f.wait(t)
            pr.finish_scales()
            pr.sync()
        t1 = time.perf_counter()
        stats["amax_s"] = t1 - t0
        # 2. the slot is free once every receiver released the version that was in it
        prev = version - (self._slots or 2)
        if prev in self._pushed and pr.receivers:
            eng.wait_imm(imm_for(IMM_RELEASE, prev), len(pr.receivers), t)
        t2 = time.perf_counter()
        stats["release_wait_s"] = t2 - t1
        imm = imm_for(IMM_DATA, version)
        for r in pr.scale_requests:
            futs.extend(self._submit(r, version, imm, t))
        # 3. the pipeline: fill a staging buffer once its previous writes completed
        ring_futs: Dict[int, List[Any]] = {}
        window: List[List[Any]] = []
        fill_s = 0.0
        for b in pr.batches:
            if b.ring >= 0:
                for f in ring_futs.pop(b.ring, []):
                    f.wait(t)
                tf = time.perf_counter()
                pr.fill(b)
                pr.sync()  # the writes read what the fill wrote
                fill_s += time.perf_counter() - tf
            else:
                if len(window) >= pr.depth:
                    for f in window.pop(0):
                        f.wait(t)
            mine = [x for r in b.requests for x in self._submit(r, version, imm, t)]
            futs.extend(mine)
            if b.ring >= 0:
                ring_futs[b.ring] = [f for f, _ in mine]
            else:
                window.append([f for f, _ in mine])
        # 4. stamps
        pr.stamp[0] = version
        pr.sync()
        for r in pr.stamp_requests:
            futs.extend(self._submit(r, version, imm, t))
        t3 = time.perf_counter()
        got = {d: 0 for d in pr.receivers}
        for f, order in futs:
            f.wait(t)
            for d, c in zip(order, f.imm_counts):
                got[d] += c
        t4 = time.perf_counter()
        if got != self._counts:
            raise WeightTransferError(
                f"rank {self.rank}: sent immediates {got}, promised {self._counts}"
            )
        self._pushed.add(version)
        self._pushed.discard(version - 2)  # (only version - slots is ever looked up)
        stats.update(
            fill_s=fill_s,
            submit_s=t3 - t2 - fill_s,
            drain_s=t4 - t3,
            total_s=t4 - t0,
            writes=float(len(futs)),
        )
        return stats


# ------------------------------------------------------------------------------------------------
# in-process simulation
# ------------------------------------------------------------------------------------------------


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
