"""The executor's torch path: training buffers, staging, scales and stamps as torch tensors.

:class:`TorchProgram` is the training rank's program of :mod:`.program` with its memory on a
torch device (``"cuda:N"``; ``"cpu"`` runs the same code on the host): the gather into the
staging ring, the per-tile ``max |x|`` pass and the bf16 -> fp8 e4m3 conversion run as torch
ops on that device, with the arithmetic of :mod:`.convert` (float32 ``x / scale``, clip to
+-448, round to nearest even), so the results are bit-identical to the numpy path. Buffers on
another device than the program's (CPU-offloaded shards) are copied host-to-device piece by
piece in the pipeline. Registered GPU memory moves over NVLink between processes of one host,
or through the engine's staging buffers over any provider.

torch is imported lazily; nothing here needs ``ml_dtypes``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from ..errors import WeightTransferError
from .convert import DEFAULT_BLOCK, FP8_MAX
from .layout import ITEMSIZE, TrainingLayout
from .plan import WeightPlan
from .program import _Batch, _Program, _split
from .torch_dtypes import torch_dtype

__all__ = [
    "torch_dtype",
    "TorchProgram",
    "quantize_blockwise_torch",
    "shard_buffers_torch",
]

#: Elements per torch op of the tile-maxima pass (bounds its temporary memory).
_CHUNK = 1 << 24


def _scales(amax: Any) -> Any:
    """``amax / 448`` in float32, 1 where ``amax`` is not > 0 (as ``scale_from_amax``)."""
    import torch

    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _quantize(x: Any, scales: Any) -> Any:
    """``fp8(clip(x / scales, -448, 448))``, float32 arithmetic, round to nearest even."""
    import torch

    q = x.float() / scales
    return q.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_blockwise_torch(x: Any, block: Tuple[int, int] = DEFAULT_BLOCK) -> Tuple[Any, Any]:
    """The whole-tensor reference conversion in torch: ``(fp8 values, float32 tile scales)``,
    bit-identical to :func:`.convert.quantize_blockwise`."""
    import torch

    if x.dim() != 2:
        raise ValueError(f"blockwise fp8 needs a 2-d tensor, got shape {tuple(x.shape)}")
    r, c = x.shape
    gr, gc = -(-r // block[0]), -(-c // block[1])
    pad = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32, device=x.device)
    pad[:r, :c] = x.float().abs()
    amax = pad.view(gr, block[0], gc, block[1]).amax(dim=(1, 3))
    s = _scales(amax)
    per = s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:r, :c]
    return _quantize(x, per), s


def shard_buffers_torch(train: TrainingLayout, rank: int, tensors: Mapping[str, Any]) -> Dict:
    """:meth:`TrainingLayout.shard_buffers` for torch tensors (on their device): ``rank``'s
    flat buffers built from the full tensors (padding zero-filled)."""
    import torch

    from .layout import DimShard, _norm_dim, split_bounds

    out: Dict[str, Any] = {}
    for bname in train.buffers(rank):
        kind, name = bname.split(":", 1)
        if kind == "group":
            g = train.groups[name]
            i = g.ranks.index(rank)
            s = train.shard_numel(name)
            first = tensors[g.params[0]]
            buf = torch.zeros(s, dtype=first.dtype, device=first.device)
            lo, hi = i * s, (i + 1) * s
            for pname, off in train.group_offsets[name].items():
                t = tensors[pname].reshape(-1)
                a, b = max(lo, off), min(hi, off + t.numel())
                if a < b:
                    buf[a - lo : b - lo] = t[a - off : b - off]
            out[bname] = buf
        else:
            p = train.params[train.index[name]]
            pl = next(x for x in train.placements[name] if isinstance(x, DimShard))
            d = _norm_dim(pl.dim, len(p.shape), name)
            bounds = split_bounds(p.shape[d], len(pl.ranks))
            i = pl.ranks.index(rank)
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            out[bname] = tensors[name].narrow(d, lo, hi - lo).contiguous().reshape(-1)
    return out


class TorchProgram(_Program):
    """A training rank's program with its memory on a torch device (see the module doc)."""

    def __init__(
        self,
        plan: WeightPlan,
        rank: int,
        buffers: Mapping[str, Any],
        *,
        staging_bytes: int,
        depth: int,
        host_copy: bool,
        device: str,
        max_items: int = 256,
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        # Shards held elsewhere (offloaded to the host) go through the staging ring, where the
        # host-to-device copy happens piece by piece.
        offloaded = any(getattr(b, "device", self.device) != self.device for b in buffers.values())
        super().__init__(
            plan,
            rank,
            buffers,
            staging_bytes=staging_bytes,
            depth=depth,
            host_copy=host_copy or offloaded,
            max_items=max_items,
        )
        self._tile_cache: Dict[int, Any] = {}

    # -- memory --

    def _load_buffers(self, buffers: Mapping[str, Any], need: Mapping[str, Any]) -> List[Any]:
        torch = self.torch
        out: List[Any] = []
        for bname in self.buf_names:
            if bname not in buffers:
                raise WeightTransferError(f"training rank {self.rank}: buffer {bname!r} not given")
            a = buffers[bname]
            numel, dt = need[bname]
            want = torch_dtype(dt)
            if not isinstance(a, torch.Tensor) or not a.is_contiguous() or a.numel() < numel:
                raise WeightTransferError(
                    f"buffer {bname!r}: needs a contiguous torch tensor of {numel} {dt} elements"
                )
            if a.dtype != want:
                if a.element_size() * a.numel() < numel * ITEMSIZE[dt]:
                    raise WeightTransferError(f"buffer {bname!r}: {a.dtype}, expected {want}")
                a = a.reshape(-1).view(torch.uint8)[: numel * ITEMSIZE[dt]].view(want)
            out.append(a.reshape(-1)[:numel])
        return out

    def _alloc(self, scales: int, staging: int) -> None:
        torch, dev = self.torch, self.device
        self.scale_out = torch.ones(max(scales, 1), dtype=torch.float32, device=dev)
        self.amax = {
            p: torch.zeros(g[0] * g[1], dtype=torch.float32, device=dev)
            for p, g in self.fp8.items()
        }
        self.stamp = torch.zeros(1, dtype=torch.int64, device=dev)  # uint64 bytes < 2**63
        self.staging = torch.zeros(max(staging, 1), dtype=torch.uint8, device=dev)

    def sync(self) -> None:
        # Only the stream this program's copies and conversions ran on. A device-wide
        # synchronize would also wait for the engine's copy streams (same device, same
        # context), so every staging refill would drain every write in flight.
        if self.device.type == "cuda":
            self.torch.cuda.current_stream(self.device).synchronize()

    def source(self, key: Tuple[Any, ...]) -> Any:
        torch = self.torch
        if key[0] == "buf":
            return self.arrays[key[1]].view(torch.uint8)
        return {
            "staging": self.staging,
            "scales": self.scale_out.view(torch.uint8),
            "stamp": self.stamp.view(torch.uint8),
        }[key[0]]

    # -- views and tiles --

    def _view(self, lb: int, so: int, ln: int, cnt: int, sst: int) -> Any:
        a = self.arrays[lb]
        v = a.as_strided((cnt, ln), (sst, 1), a.storage_offset() + so)
        return v.to(self.device, non_blocking=True) if a.device != self.device else v

    def _tiles(self, p: int, d: int, do: int, ln: int, cnt: int, dst: int) -> Any:
        torch, dev = self.torch, self.device
        e = self.layouts[d].entry(p)
        k = torch.arange(cnt, dtype=torch.int64, device=dev)[:, None] * dst
        idx = do + k + torch.arange(ln, dtype=torch.int64, device=dev)
        r = torch.div(idx, e.shape[1], rounding_mode="floor")
        c = idx - r * e.shape[1]
        gcols = self.fp8[p][1]
        return ((r + e.lo[0]) // self.block[0]) * gcols + (c + e.lo[1]) // self.block[1]

    def _scatter_amax(self, grid: Any, ids: Any, vals: Any) -> None:
        grid.scatter_reduce_(0, ids.reshape(-1), vals.reshape(-1), reduce="amax")

    # -- per update --

    def local_amax(self) -> None:
        for p, rows in self.rows_by_param.items():
            g: Any = self.amax[p]  # a torch tensor here (numpy in the CPU program)
            g.zero_()
            for row in rows:
                for piece in _split(row, _CHUNK):
                    _, lb, so, ln, cnt, sst, d, do, dst = piece
                    v = self._view(lb, so, ln, cnt, sst).abs().float()
                    self._scatter_amax(g, self._tiles(p, d, do, ln, cnt, dst), v)

    def _tile_ids(self, peer: int) -> Dict[int, Tuple[np.ndarray, Any]]:
        if peer not in self._tile_cache:
            params, tiles = self.peer_tiles[peer]
            out = {}
            for p in np.unique(params):
                m = params == p
                t = self.torch.as_tensor(tiles[m].astype(np.int64), device=self.device)
                out[int(p)] = (m, t)
            self._tile_cache[peer] = out
        return self._tile_cache[peer]

    def partials(self, peer: int) -> np.ndarray:
        params, _ = self.peer_tiles[peer]
        out = np.empty(params.size, dtype=np.float32)
        for p, (m, t) in self._tile_ids(peer).items():
            out[m] = self.amax[p][t].cpu().numpy()
        return out

    def merge(self, peer: int, values: np.ndarray) -> None:
        for p, (m, t) in self._tile_ids(peer).items():
            v = self.torch.as_tensor(np.ascontiguousarray(values[m]), device=self.device)
            self._scatter_amax(self.amax[p], t, v)

    def finish_scales(self) -> None:
        for p, off in self.scale_off.items():
            g: Any = self.amax[p]
            self.scale_out[off : off + g.numel()] = _scales(g)

    def fill(self, batch: _Batch) -> None:
        torch = self.torch
        infer = self.plan.infer
        for p, lb, so, ln, cnt, sst, d, do, dst, sbase in batch.fills:
            src = self._view(lb, so, ln, cnt, sst)
            d_dt = infer.dtype(infer.params[p].name)
            n = ln * cnt * ITEMSIZE[d_dt]
            out: Any = self.staging[sbase : sbase + n]
            if p in self.fp8:
                off = self.scale_off[p]
                sc = self.scale_out[off + self._tiles(p, d, do, ln, cnt, dst)]
                out.copy_(_quantize(src, sc).view(torch.uint8).reshape(-1))
            else:
                out.view(torch_dtype(d_dt)).copy_(src.reshape(-1))


def full_tensors(
    params: Sequence[Any], seed: int, version: int, device: str, scale_exp: bool = True
) -> Dict[str, Any]:
    """Deterministic bf16 parameters of update ``version`` made on ``device`` (tests and
    benchmarks: every process computes the same tensors)."""
    import torch

    out: Dict[str, Any] = {}
    for i, p in enumerate(params):
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + version * 7919 + i)
        x = torch.randn(tuple(p.shape), generator=g, device=device, dtype=torch.float32)
        if scale_exp:
            e = torch.randint(-8, 8, tuple(p.shape), generator=g, device=device)
            x = x * torch.pow(2.0, e.float())
        out[p.name] = x.to(torch_dtype(p.dtype))
    return out
