"""Where every parameter lives: the training layout and the inference layout.

A *parameter set* is an ordered tuple of :class:`ParamSpec` (name, shape, dtype). Each side
describes, per parameter, one or more *replicas*; each replica partitions the whole tensor over
some ranks:

- :class:`DimShard` splits the tensor along one dimension into contiguous chunks (sizes as
  ``numpy.array_split``), chunk ``i`` on ``ranks[i]``. One rank is a whole tensor (an expert on
  its expert-parallel rank, a replicated norm); dim 0 is a *row* shard, dim -1 a *column* shard
  (tensor parallelism). The rank stores its chunk as a contiguous row-major array.
- :class:`FlatShard` (training only) puts the tensor in an FSDP-style :class:`FlatGroup`: the
  group's parameters are flattened and concatenated in order, padded to a multiple of the group
  size, and rank ``i`` of the group holds the ``i``-th equal slice as one flat buffer.

Training ranks hold *buffers*: one per flat group they belong to (``"group:<name>"``) and one per
dim-sharded parameter they hold a chunk of (``"param:<name>"``). Inference ranks hold one shard
of each parameter placed on them, in a destination dtype (the source dtype, or
``float8_e4m3fn`` with per-block float32 scales).

Everything here is geometry on boxes (per-dimension ``[lo, hi)`` ranges in tensor coordinates);
:mod:`stolon.weights.plan` intersects the two sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import LayoutError

__all__ = [
    "BF16",
    "FP8",
    "ITEMSIZE",
    "ParamSpec",
    "DimShard",
    "FlatShard",
    "FlatGroup",
    "Placement",
    "TrainingLayout",
    "InferenceLayout",
    "LayoutError",
    "whole",
    "row_shard",
    "col_shard",
    "split_bounds",
    "numpy_dtype",
    "ParamInfo",
    "MoEModel",
    "moe_model",
    "kimi_k2_model",
    "fsdp_pp_ep_training",
    "ep_tp_inference",
]

BF16 = "bfloat16"
FP8 = "float8_e4m3fn"

#: Bytes per element of the dtypes a layout may name.
ITEMSIZE: Dict[str, int] = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "float8_e4m3fn": 1,
    "uint8": 1,
}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype for a layout dtype name (bfloat16 and float8 come from ``ml_dtypes``)."""
    if dtype in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, dtype))
    if dtype not in ITEMSIZE:
        raise LayoutError(f"unsupported dtype {dtype!r}; known: {sorted(ITEMSIZE)}")
    return np.dtype(dtype)


@dataclass(frozen=True)
class ParamSpec:
    """One named parameter: its full (unsharded) shape and its training dtype."""

    name: str
    shape: Tuple[int, ...]
    dtype: str = BF16

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.shape or any(d <= 0 for d in self.shape):
            raise LayoutError(f"{self.name}: shape {self.shape} must be non-empty and positive")
        if self.dtype not in ITEMSIZE:
            raise LayoutError(f"{self.name}: unsupported dtype {self.dtype!r}")

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes in the training dtype."""
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class DimShard:
    """The tensor split along ``dim`` into ``len(ranks)`` chunks; chunk ``i`` lives on ``ranks[i]``.

    Chunk sizes follow ``numpy.array_split`` (the first ``n % k`` chunks are one longer). Each
    rank stores its chunk contiguously in row-major order. ``ranks`` must be distinct.
    """

    ranks: Tuple[int, ...]
    dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.ranks:
            raise LayoutError("DimShard needs at least one rank")
        if len(set(self.ranks)) != len(self.ranks):
            raise LayoutError(f"DimShard ranks {self.ranks} repeat a rank")


@dataclass(frozen=True)
class FlatShard:
    """The tensor is a member of the FSDP flat group ``group`` (see :class:`FlatGroup`)."""

    group: str


Placement = Union[DimShard, FlatShard]


def whole(rank: int) -> DimShard:
    """The whole tensor on one rank."""
    return DimShard((rank,), 0)


def row_shard(ranks: Sequence[int]) -> DimShard:
    """Split along dim 0 (rows) over ``ranks``."""
    return DimShard(tuple(ranks), 0)


def col_shard(ranks: Sequence[int]) -> DimShard:
    """Split along the last dim (columns) over ``ranks``."""
    return DimShard(tuple(ranks), -1)


@dataclass(frozen=True)
class FlatGroup:
    """FSDP-style flat parameter: ``params`` flattened and concatenated in order, then split.

    The concatenation (``total`` elements) is padded so every rank holds ``shard_numel``
    elements (``ceil(total / len(ranks))`` rounded up to a multiple of ``align``); rank
    ``ranks[i]`` holds elements ``[i * shard_numel, (i + 1) * shard_numel)``. All members share one
    dtype.
    """

    name: str
    params: Tuple[str, ...]
    ranks: Tuple[int, ...]
    align: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.ranks or len(set(self.ranks)) != len(self.ranks):
            raise LayoutError(f"group {self.name}: ranks {self.ranks} empty or repeated")
        if len(set(self.params)) != len(self.params):
            raise LayoutError(f"group {self.name}: a parameter appears twice")
        if self.align < 1:
            raise LayoutError(f"group {self.name}: align must be >= 1")


def split_bounds(n: int, parts: int) -> np.ndarray:
    """``parts + 1`` boundaries of ``numpy.array_split(range(n), parts)``."""
    base, extra = divmod(n, parts)
    sizes = np.full(parts, base, dtype=np.int64)
    sizes[:extra] += 1
    out = np.zeros(parts + 1, dtype=np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


def _norm_dim(dim: int, ndim: int, what: str) -> int:
    d = dim + ndim if dim < 0 else dim
    if not 0 <= d < ndim:
        raise LayoutError(f"{what}: dim {dim} out of range for a {ndim}-d tensor")
    return d


def dim_shard_boxes(shape: Tuple[int, ...], dim: int, parts: int) -> Tuple[np.ndarray, np.ndarray]:
    """Boxes ``(lo, hi)``, each ``(parts, ndim)``, of the chunks of a :class:`DimShard`."""
    nd = len(shape)
    b = split_bounds(shape[dim], parts)
    lo = np.zeros((parts, nd), dtype=np.int64)
    hi = np.tile(np.asarray(shape, dtype=np.int64), (parts, 1))
    lo[:, dim] = b[:-1]
    hi[:, dim] = b[1:]
    return lo, hi


@dataclass(frozen=True)
class SourceSlot:
    """One piece of a parameter held by one training rank (internal to planning)."""

    rank: int
    buffer: int  # global buffer id (TrainingLayout.buffer_names)
    base: int  # local element offset = base + (row-major offset inside the frame)


@dataclass
class TrainingLayout:
    """Where each parameter lives on the training ranks (``0 .. world-1``).

    ``placements[name]`` is a tuple of replicas (usually one); ``groups`` names the flat groups
    that :class:`FlatShard` placements refer to.
    """

    params: Tuple[ParamSpec, ...]
    world: int
    placements: Mapping[str, Tuple[Placement, ...]]
    groups: Mapping[str, FlatGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = tuple(self.params)
        self.validate()

    # -- derived tables --

    @cached_property
    def index(self) -> Dict[str, int]:
        """Parameter name -> position."""
        return {p.name: i for i, p in enumerate(self.params)}

    @cached_property
    def group_offsets(self) -> Dict[str, Dict[str, int]]:
        """Per group, each member's element offset in the concatenation."""
        out: Dict[str, Dict[str, int]] = {}
        for g in self.groups.values():
            off = 0
            d: Dict[str, int] = {}
            for name in g.params:
                d[name] = off
                off += self.params[self.index[name]].numel
            out[g.name] = d
        return out

    @cached_property
    def group_total(self) -> Dict[str, int]:
        """Per group, elements before padding."""
        return {
            g.name: sum(self.params[self.index[n]].numel for n in g.params)
            for g in self.groups.values()
        }

    def shard_numel(self, group: str) -> int:
        """Elements each rank of ``group`` holds (padding included)."""
        g = self.groups[group]
        s = -(-self.group_total[group] // len(g.ranks))
        return -(-s // g.align) * g.align

    @cached_property
    def buffer_names(self) -> Tuple[str, ...]:
        """Global buffer ids: flat groups first, then dim-sharded parameters."""
        names = [f"group:{g}" for g in self.groups]
        for p in self.params:
            if any(isinstance(pl, DimShard) for pl in self.placements[p.name]):
                names.append(f"param:{p.name}")
        return tuple(names)

    @cached_property
    def buffer_ids(self) -> Dict[str, int]:
        """Buffer name -> id."""
        return {n: i for i, n in enumerate(self.buffer_names)}

    def validate(self) -> None:
        """Raises :class:`LayoutError` unless every parameter is placed exactly once per replica
        and no rank holds two pieces of one parameter."""
        if self.world < 1:
            raise LayoutError("training world must be >= 1")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise LayoutError("parameter names repeat")
        members: Dict[str, List[str]] = {}
        for gname, g in self.groups.items():
            if gname != g.name:
                raise LayoutError(f"group key {gname!r} != group name {g.name!r}")
            dtypes = set()
            for n in g.params:
                if n not in self.index:
                    raise LayoutError(f"group {gname}: unknown parameter {n!r}")
                members.setdefault(n, []).append(gname)
                dtypes.add(self.params[self.index[n]].dtype)
            if len(dtypes) > 1:
                raise LayoutError(f"group {gname}: mixed dtypes {sorted(dtypes)}")
            for r in g.ranks:
                if not 0 <= r < self.world:
                    raise LayoutError(f"group {gname}: rank {r} outside world {self.world}")
        for p in self.params:
            pls = self.placements.get(p.name)
            if not pls:
                raise LayoutError(f"{p.name}: no training placement")
            held: set = set()
            groups_seen = []
            for pl in pls:
                if isinstance(pl, FlatShard):
                    if pl.group not in self.groups:
                        raise LayoutError(f"{p.name}: unknown group {pl.group!r}")
                    if p.name not in self.groups[pl.group].params:
                        raise LayoutError(f"{p.name}: not a member of group {pl.group!r}")
                    ranks = self.groups[pl.group].ranks
                    groups_seen.append(pl.group)
                elif isinstance(pl, DimShard):
                    _norm_dim(pl.dim, len(p.shape), p.name)
                    ranks = pl.ranks
                else:
                    raise LayoutError(f"{p.name}: unknown placement {pl!r}")
                for r in ranks:
                    if not 0 <= r < self.world:
                        raise LayoutError(f"{p.name}: rank {r} outside world {self.world}")
                if held.intersection(ranks):
                    raise LayoutError(f"{p.name}: a rank holds two replicas")
                held.update(ranks)
            if sum(isinstance(pl, DimShard) for pl in pls) > 1:
                raise LayoutError(f"{p.name}: at most one DimShard replica (one buffer per rank)")
            if sorted(groups_seen) != sorted(members.get(p.name, [])):
                raise LayoutError(f"{p.name}: group membership and FlatShard placements differ")

    # -- per rank --

    def buffers(self, rank: int) -> Dict[str, Tuple[int, str]]:
        """The buffers ``rank`` holds: name -> (elements, dtype)."""
        out: Dict[str, Tuple[int, str]] = {}
        for g in self.groups.values():
            if rank in g.ranks:
                dt = self.params[self.index[g.params[0]]].dtype if g.params else "uint8"
                out[f"group:{g.name}"] = (self.shard_numel(g.name), dt)
        for p in self.params:
            for pl in self.placements[p.name]:
                if isinstance(pl, DimShard) and rank in pl.ranks:
                    d = _norm_dim(pl.dim, len(p.shape), p.name)
                    b = split_bounds(p.shape[d], len(pl.ranks))
                    i = pl.ranks.index(rank)
                    n = p.numel // p.shape[d] * int(b[i + 1] - b[i])
                    out[f"param:{p.name}"] = (n, p.dtype)
        return out

    def buffer_sizes(self) -> Dict[Tuple[int, int], int]:
        """Elements of every buffer of every rank: ``(rank, buffer id) -> elements`` (one pass)."""
        out: Dict[Tuple[int, int], int] = {}
        for g in self.groups.values():
            b = self.buffer_ids[f"group:{g.name}"]
            n = self.shard_numel(g.name)
            for r in g.ranks:
                out[(r, b)] = n
        for p in self.params:
            for pl in self.placements[p.name]:
                if isinstance(pl, DimShard):
                    d = _norm_dim(pl.dim, len(p.shape), p.name)
                    bounds = split_bounds(p.shape[d], len(pl.ranks))
                    b = self.buffer_ids[f"param:{p.name}"]
                    for i, r in enumerate(pl.ranks):
                        out[(r, b)] = p.numel // p.shape[d] * int(bounds[i + 1] - bounds[i])
        return out

    def shard_buffers(self, rank: int, tensors: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Reference sharding: builds ``rank``'s buffers from full tensors (tests, examples).

        ``tensors[name]`` has the parameter's shape; the result maps buffer names to flat arrays
        of the tensors' dtype (padding zero-filled).
        """
        out: Dict[str, np.ndarray] = {}
        for bname, (n, _dt) in self.buffers(rank).items():
            kind, name = bname.split(":", 1)
            if kind == "group":
                g = self.groups[name]
                i = g.ranks.index(rank)
                s = self.shard_numel(name)
                first = tensors[g.params[0]] if g.params else np.zeros(0, np.uint8)
                buf = np.zeros(s, dtype=first.dtype)
                lo, hi = i * s, (i + 1) * s
                for pname, off in self.group_offsets[name].items():
                    t = np.ascontiguousarray(tensors[pname]).reshape(-1)
                    a, b = max(lo, off), min(hi, off + t.size)
                    if a < b:
                        buf[a - lo : b - lo] = t[a - off : b - off]
                out[bname] = buf
            else:
                p = self.params[self.index[name]]
                pl = next(x for x in self.placements[name] if isinstance(x, DimShard))
                d = _norm_dim(pl.dim, len(p.shape), name)
                bounds = split_bounds(p.shape[d], len(pl.ranks))
                i = pl.ranks.index(rank)
                sl = [slice(None)] * len(p.shape)
                sl[d] = slice(int(bounds[i]), int(bounds[i + 1]))
                out[bname] = np.ascontiguousarray(tensors[name][tuple(sl)]).reshape(-1)
                assert out[bname].size == n
        return out

    def source_replicas(self, i: int) -> List[Tuple[tuple, List[SourceSlot]]]:
        """Per replica of parameter ``i``: a geometry key and its slots (planning internals).

        The key is ``("d", dim, parts)`` for a :class:`DimShard` (slot ``k`` = chunk ``k``) or
        ``("f", (a0, b0, a1, b1, ...))`` for a :class:`FlatShard`: the flat element ranges of
        the tensor that successive group ranks hold (slot ``k`` = range ``k``).
        """
        p = self.params[i]
        out: List[Tuple[tuple, List[SourceSlot]]] = []
        for pl in self.placements[p.name]:
            if isinstance(pl, DimShard):
                d = _norm_dim(pl.dim, len(p.shape), p.name)
                buf = self.buffer_ids[f"param:{p.name}"]
                out.append((("d", d, len(pl.ranks)), [SourceSlot(r, buf, 0) for r in pl.ranks]))
            else:
                g = self.groups[pl.group]
                off = self.group_offsets[g.name][p.name]
                s = self.shard_numel(g.name)
                n = p.numel
                buf = self.buffer_ids[f"group:{g.name}"]
                j0, j1 = off // s, (off + n - 1) // s
                iv: List[int] = []
                slots: List[SourceSlot] = []
                for j in range(j0, j1 + 1):
                    iv.append(max(j * s - off, 0))
                    iv.append(min((j + 1) * s - off, n))
                    slots.append(SourceSlot(g.ranks[j], buf, off - j * s))
                out.append((("f", tuple(iv)), slots))
        return out


@dataclass
class InferenceLayout:
    """Where each parameter lives on the inference ranks (``0 .. world-1``), and in which dtype.

    ``placements[name]`` is a tuple of :class:`DimShard` replicas; a rank holds at most one shard
    of a parameter. ``dtypes[name]`` is the destination dtype (default: the training dtype);
    ``float8_e4m3fn`` (2-d parameters only) means blockwise fp8 with one float32 scale per
    ``block`` tile of the *whole* tensor, the tiles a shard touches stored next to it.
    """

    params: Tuple[ParamSpec, ...]
    world: int
    placements: Mapping[str, Tuple[DimShard, ...]]
    dtypes: Mapping[str, str] = field(default_factory=dict)
    block: Tuple[int, int] = (128, 128)

    def __post_init__(self) -> None:
        self.params = tuple(self.params)
        self.block = (int(self.block[0]), int(self.block[1]))
        self.validate()

    @cached_property
    def index(self) -> Dict[str, int]:
        """Parameter name -> position."""
        return {p.name: i for i, p in enumerate(self.params)}

    def dtype(self, name: str) -> str:
        """Destination dtype of ``name``."""
        return self.dtypes.get(name, self.params[self.index[name]].dtype)

    def is_fp8(self, name: str) -> bool:
        """Whether ``name`` is converted to blockwise fp8."""
        return self.dtype(name) == FP8 and self.params[self.index[name]].dtype != FP8

    def validate(self) -> None:
        """Raises :class:`LayoutError` on an inconsistent layout."""
        if self.world < 1:
            raise LayoutError("inference world must be >= 1")
        if min(self.block) < 1:
            raise LayoutError(f"block {self.block} must be positive")
        for p in self.params:
            pls = self.placements.get(p.name)
            if not pls:
                raise LayoutError(f"{p.name}: no inference placement")
            held: set = set()
            for pl in pls:
                if not isinstance(pl, DimShard):
                    raise LayoutError(f"{p.name}: inference placements are DimShard only")
                _norm_dim(pl.dim, len(p.shape), p.name)
                if held.intersection(pl.ranks):
                    raise LayoutError(f"{p.name}: a rank holds two replicas")
                for r in pl.ranks:
                    if not 0 <= r < self.world:
                        raise LayoutError(f"{p.name}: rank {r} outside world {self.world}")
                held.update(pl.ranks)
            dt = self.dtype(p.name)
            if dt not in ITEMSIZE:
                raise LayoutError(f"{p.name}: unsupported destination dtype {dt!r}")
            if dt == FP8 and p.dtype != FP8 and len(p.shape) != 2:
                raise LayoutError(f"{p.name}: fp8 conversion needs a 2-d parameter")
            if dt != p.dtype and dt != FP8 and p.dtype == FP8:
                raise LayoutError(f"{p.name}: cannot convert fp8 to {dt}")
        for name in self.dtypes:
            if name not in self.index:
                raise LayoutError(f"dtypes names unknown parameter {name!r}")

    def shard_box(self, name: str, rank: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """``(lo, hi)`` of the shard of ``name`` on ``rank``, or None if it holds none."""
        p = self.params[self.index[name]]
        for pl in self.placements[name]:
            if rank in pl.ranks:
                d = _norm_dim(pl.dim, len(p.shape), name)
                lo, hi = dim_shard_boxes(p.shape, d, len(pl.ranks))
                k = pl.ranks.index(rank)
                return lo[k], hi[k]
        return None

    def shard_shape(self, name: str, rank: int) -> Optional[Tuple[int, ...]]:
        """Shape of ``rank``'s shard of ``name`` (None if it holds none)."""
        box = self.shard_box(name, rank)
        return None if box is None else tuple(int(x) for x in box[1] - box[0])

    def scale_box(self, name: str, rank: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Block-grid box (``lo``, ``hi``) of the scales stored with ``rank``'s fp8 shard."""
        box = self.shard_box(name, rank)
        if box is None or not self.is_fp8(name):
            return None
        bl = np.asarray(self.block, dtype=np.int64)
        if np.any(box[1] <= box[0]):  # an empty shard stores no scales
            return box[0] // bl, box[0] // bl
        return box[0] // bl, -(-box[1] // bl)

    def reference_shard(self, name: str, rank: int, full: np.ndarray) -> np.ndarray:
        """Reference: ``rank``'s shard of the full tensor (in the source dtype)."""
        box = self.shard_box(name, rank)
        if box is None:
            raise LayoutError(f"rank {rank} holds no shard of {name}")
        return full[tuple(slice(int(a), int(b)) for a, b in zip(*box))]


# ------------------------------------------------------------------------------------------------
# model presets: a DeepSeek-V3 / Kimi-K2 shaped MoE transformer and the layouts of issue 7
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """What the layout builders need to know about a parameter of a :class:`MoEModel`."""

    layer: int  # -1: embedding; num_layers: final norm and head
    expert: int  # routed expert index, -1 for everything else
    tp_dim: Optional[int]  # dim split by inference tensor parallelism; None: replicated
    fp8: bool  # converted to fp8 at inference


@dataclass
class MoEModel:
    """A parameter list with the metadata the preset layouts use."""

    params: Tuple[ParamSpec, ...]
    info: Tuple[ParamInfo, ...]
    num_layers: int
    num_experts: int

    @property
    def numel(self) -> int:
        """Total parameters."""
        return sum(p.numel for p in self.params)


def moe_model(
    *,
    layers: int,
    dense_layers: int,
    experts: int,
    hidden: int,
    expert_inter: int,
    dense_inter: int,
    shared_experts: int,
    vocab: int,
    heads: int,
    q_lora: int,
    kv_lora: int,
    qk_nope: int,
    qk_rope: int,
    v_head: int,
    dtype: str = BF16,
) -> MoEModel:
    """A DeepSeek-V3-style MoE transformer with MLA attention, one tensor per expert matrix.

    Inference tensor parallelism splits q_b / kv_b / gate / up / the vocabulary on dim 0 and
    o_proj / down on dim 1; q_a / kv_a, norms and the router are replicated. Weight matrices are
    fp8 at inference; embeddings, head, norms, router stay in the training dtype.
    """
    params: List[ParamSpec] = []
    info: List[ParamInfo] = []

    def add(
        name: str, shape: Tuple[int, ...], layer: int, tp: Optional[int], fp8: bool, e: int = -1
    ) -> None:
        params.append(ParamSpec(name, shape, dtype))
        info.append(ParamInfo(layer, e, tp, fp8))

    add("embed_tokens.weight", (vocab, hidden), -1, 0, False)
    for li in range(layers):
        pre = f"layers.{li}."
        add(pre + "input_layernorm.weight", (hidden,), li, None, False)
        add(pre + "self_attn.q_a_proj.weight", (q_lora, hidden), li, None, True)
        add(pre + "self_attn.q_a_layernorm.weight", (q_lora,), li, None, False)
        add(pre + "self_attn.q_b_proj.weight", (heads * (qk_nope + qk_rope), q_lora), li, 0, True)
        add(
            pre + "self_attn.kv_a_proj_with_mqa.weight", (kv_lora + qk_rope, hidden), li, None, True
        )
        add(pre + "self_attn.kv_a_layernorm.weight", (kv_lora,), li, None, False)
        add(pre + "self_attn.kv_b_proj.weight", (heads * (qk_nope + v_head), kv_lora), li, 0, True)
        add(pre + "self_attn.o_proj.weight", (hidden, heads * v_head), li, 1, True)
        add(pre + "post_attention_layernorm.weight", (hidden,), li, None, False)
        if li < dense_layers:
            add(pre + "mlp.gate_proj.weight", (dense_inter, hidden), li, 0, True)
            add(pre + "mlp.up_proj.weight", (dense_inter, hidden), li, 0, True)
            add(pre + "mlp.down_proj.weight", (hidden, dense_inter), li, 1, True)
            continue
        add(pre + "mlp.gate.weight", (experts, hidden), li, None, False)
        if shared_experts:
            si = expert_inter * shared_experts
            add(pre + "mlp.shared_experts.gate_proj.weight", (si, hidden), li, 0, True)
            add(pre + "mlp.shared_experts.up_proj.weight", (si, hidden), li, 0, True)
            add(pre + "mlp.shared_experts.down_proj.weight", (hidden, si), li, 1, True)
        for e in range(experts):
            ep = f"{pre}mlp.experts.{e}."
            add(ep + "gate_proj.weight", (expert_inter, hidden), li, None, True, e)
            add(ep + "up_proj.weight", (expert_inter, hidden), li, None, True, e)
            add(ep + "down_proj.weight", (hidden, expert_inter), li, None, True, e)
    add("norm.weight", (hidden,), layers, None, False)
    add("lm_head.weight", (vocab, hidden), layers, 0, False)
    return MoEModel(tuple(params), tuple(info), layers, experts)


def kimi_k2_model() -> MoEModel:
    """Kimi-K2's parameter list (about 1.03T parameters): 61 layers (the first dense), 384
    routed experts + 1 shared expert per MoE layer, hidden 7168, expert intermediate 2048, MLA."""
    return moe_model(
        layers=61,
        dense_layers=1,
        experts=384,
        hidden=7168,
        expert_inter=2048,
        dense_inter=18432,
        shared_experts=1,
        vocab=163840,
        heads=64,
        q_lora=1536,
        kv_lora=512,
        qk_nope=128,
        qk_rope=64,
        v_head=128,
    )


def _stage_of(model: MoEModel, pp: int) -> List[int]:
    """Pipeline stage of each layer slot (-1 .. num_layers): layers split evenly over ``pp``;
    the embedding sits with the first stage and the head with the last."""
    b = split_bounds(model.num_layers, pp)
    stage = np.searchsorted(b[1:], np.arange(model.num_layers), side="right")
    return [0] + [int(s) for s in stage] + [pp - 1]


def fsdp_pp_ep_training(
    model: MoEModel, *, pp: int, ep: int, fsdp: int, align: int = 1
) -> TrainingLayout:
    """Training layout of ``pp * ep * fsdp`` ranks, rank = ``(stage * ep + e) * fsdp + f``.

    Per layer, on its pipeline stage: each expert-parallel rank ``e`` holds experts
    ``[e * E/ep, (e+1) * E/ep)`` of the layer in one flat group over its ``fsdp`` ranks; the
    layer's other parameters form one flat group over all ``ep * fsdp`` ranks of the stage
    (so dense parameters are FSDP-sharded ``ep * fsdp`` ways, experts ``fsdp`` ways). ``align``
    rounds each rank's flat shard up to a multiple of that many elements.
    """
    if model.num_experts % ep:
        raise LayoutError(f"{model.num_experts} experts do not split over ep={ep}")
    stage = _stage_of(model, pp)
    per = model.num_experts // ep
    members: Dict[Tuple[int, int], List[str]] = {}
    for p, inf in zip(model.params, model.info):
        e_rank = inf.expert // per if inf.expert >= 0 else -1
        members.setdefault((inf.layer, e_rank), []).append(p.name)
    groups: Dict[str, FlatGroup] = {}
    placements: Dict[str, Tuple[Placement, ...]] = {}
    for (layer, e_rank), names in members.items():
        s = stage[layer + 1]
        if e_rank >= 0:
            gname = f"L{layer}.ep{e_rank}"
            base = (s * ep + e_rank) * fsdp
            ranks = tuple(range(base, base + fsdp))
        else:
            gname = f"L{layer}.dense"
            ranks = tuple(range(s * ep * fsdp, (s + 1) * ep * fsdp))
        groups[gname] = FlatGroup(gname, tuple(names), ranks, align)
        fs = (FlatShard(gname),)
        for n in names:
            placements[n] = fs
    return TrainingLayout(model.params, pp * ep * fsdp, placements, groups)


def ep_tp_inference(
    model: MoEModel, *, world: int, ep: int, tp: int, fp8: bool = True
) -> InferenceLayout:
    """Inference layout: ``world / ep`` replicas of EP``ep`` for the routed experts (expert ``e``
    on rank ``replica * ep + e // (E / ep)``), and ``world / tp`` replicas of TP``tp`` for the
    other parameters (split as :func:`moe_model` says, replicated ones on every rank)."""
    if world % ep or world % tp or model.num_experts % ep:
        raise LayoutError(f"world {world}, ep {ep}, tp {tp}, experts {model.num_experts}")
    per = model.num_experts // ep
    cache: Dict[tuple, Tuple[DimShard, ...]] = {}
    replicated = tuple(whole(r) for r in range(world))
    placements: Dict[str, Tuple[DimShard, ...]] = {}
    dtypes: Dict[str, str] = {}
    for p, inf in zip(model.params, model.info):
        if inf.expert >= 0:
            e = inf.expert // per
            key: tuple = ("e", e)
            if key not in cache:
                cache[key] = tuple(whole(r * ep + e) for r in range(world // ep))
        elif inf.tp_dim is None:
            key = ("r",)
            cache[key] = replicated
        else:
            key = ("t", inf.tp_dim)
            if key not in cache:
                cache[key] = tuple(
                    DimShard(tuple(range(g * tp, (g + 1) * tp)), inf.tp_dim)
                    for g in range(world // tp)
                )
        placements[p.name] = cache[key]
        if fp8 and inf.fp8:
            dtypes[p.name] = FP8
    return InferenceLayout(model.params, world, placements, dtypes)
