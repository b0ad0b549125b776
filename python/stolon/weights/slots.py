"""The inference rank's memory map: what lies where in each slot, and typed views of it.

Both sides compute a rank's :class:`SlotLayout` from the plan (:func:`slot_layout`): the receiver
to register and read its slots, the senders to address their writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from .layout import ITEMSIZE, numpy_dtype
from .tables import WeightPlan
from .torch_dtypes import torch_dtype

__all__ = ["ShardEntry", "SlotLayout", "slot_layout", "WeightSnapshot", "unpack_slot"]

_ALIGN = 64


def _align(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


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
