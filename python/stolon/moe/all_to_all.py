"""`AllToAll`: MoE dispatch and combine on torch CUDA tensors.

The kernels live in the native module (crate ``p2p-all-to-all``); this class checks every
tensor before a pointer reaches them, bootstraps the ranks through a ``torch.distributed``
group (one ``all_gather_object`` of small handles, nothing else), and launches the phases on
the current CUDA stream.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..errors import AllToAllError, CudaUnavailableError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

    from .._native import MoeAllToAll

__all__ = ["AllToAll", "DispatchOutput", "SCALE_BLOCK"]

#: Elements per float32 scale of an fp8 token.
SCALE_BLOCK = 128

#: Native all-to-alls whose close could not meet every rank: kept allocated (see close).
_LEAKED: list[Any] = []

_PHASES = ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")


@dataclass
class DispatchOutput:
    """What a rank's experts receive.

    Rows of local expert ``e`` are ``x[offsets[e] : offsets[e] + counts[e]]`` (on the device;
    ``offsets[-1]`` is the total). Within one expert, rows come grouped by source rank in rank
    order; the order inside a source's group is not specified.
    """

    #: ``[capacity, hidden]`` received tokens, in the dispatch dtype.
    x: torch.Tensor
    #: ``[capacity, hidden / 128]`` float32 scales (fp8 dispatch), else None.
    scales: Optional[torch.Tensor]
    #: ``[experts_per_rank]`` int32 rows per local expert.
    counts: torch.Tensor
    #: ``[experts_per_rank + 1]`` int32 first row of each local expert, then the total.
    offsets: torch.Tensor


def _fail(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(msg)


class AllToAll:
    """Expert-parallel dispatch and combine among the ranks of a process group.

    Every rank builds one with the same arguments. Rank ``r`` holds experts
    ``[r * E / W, (r + 1) * E / W)``. A step is ``dispatch_send`` → ``dispatch_recv`` →
    (experts) → ``combine_send`` → ``combine_recv``, each queued on the current CUDA stream
    without any synchronisation, so other work can run between the halves and the four phases
    can be captured in a CUDA graph (pass ``num_tokens`` as a device tensor then).

    Args:
        num_experts: experts of the layer (a multiple of the world size, at most 1024).
        topk: experts per token (1..16).
        hidden: elements per token (a token must be a multiple of 16 bytes).
        max_tokens: most tokens one rank dispatches in one step.
        dispatch_dtype: ``torch.bfloat16``, ``float16``, ``float32`` or ``float8_e4m3fn``
            (then each token carries ``ceil(hidden / 128)`` float32 scales).
        combine_dtype: ``torch.bfloat16``, ``float16`` or ``float32``.
        group: the ``torch.distributed`` group used to exchange handles (default: world).
        ranks_per_node: ranks that share a node and write each other's memory directly
            (default: all of them). Ranks ``[k * n, (k + 1) * n)`` form node ``k``; ranks on
            other nodes are reached through ``engine`` by a host proxy thread. A smaller value
            than the ranks that really share a host emulates several nodes on one host.
        engine: a :class:`stolon.TransferEngine` opened with ``cuda_device`` = this device,
            needed when ``ranks_per_node`` is smaller than the world (its NVLink domain or its
            fabric, staged or not, carries the traffic between nodes).
        capacity: rows of the dispatch output (default: the most any routing can need).
        timeout: seconds a kernel waits for a peer before it gives up with
            :class:`~stolon.errors.AllToAllTimeoutError`.
        device: the CUDA device (default: the current one).
        exchange: instead of ``group``, a function that takes this rank's handle (bytes) and
            returns every rank's handle in rank order; with it, ``rank`` and ``world_size``
            must be given. ``close`` calls it once more (with ``b"close"``) as a barrier.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        topk: int,
        hidden: int,
        max_tokens: int,
        dispatch_dtype: Any = None,
        combine_dtype: Any = None,
        group: Any = None,
        ranks_per_node: Optional[int] = None,
        capacity: Optional[int] = None,
        timeout: float = 10.0,
        device: Any = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        exchange: Optional[Callable[[bytes], Sequence[bytes]]] = None,
        engine: Any = None,
    ) -> None:
        import torch

        from .._native import MoeAllToAll

        self._torch = torch
        dispatch_dtype = torch.bfloat16 if dispatch_dtype is None else dispatch_dtype
        combine_dtype = torch.bfloat16 if combine_dtype is None else combine_dtype
        dispatch_ok = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
        if dispatch_dtype not in dispatch_ok:
            raise _fail(
                f"dispatch_dtype {dispatch_dtype} is not supported "
                "(bfloat16, float16, float32 or float8_e4m3fn)"
            )
        combine_names = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
        if combine_dtype not in combine_names:
            raise _fail(
                f"combine_dtype {combine_dtype} is not supported (bfloat16, float16 or float32)"
            )
        if exchange is None:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise _fail(
                    "torch.distributed is not initialised: call init_process_group first, or "
                    "pass exchange=, rank= and world_size="
                )
            rank = dist.get_rank(group)
            world_size = dist.get_world_size(group)
        elif rank is None or world_size is None:
            raise _fail("with exchange=, rank= and world_size= must be given too")
        if device is None and not torch.cuda.is_available():
            raise CudaUnavailableError(
                "torch sees no CUDA device: stolon.moe runs on GPUs (pass device= to choose one)"
            )
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
        dev = torch.device(dev)
        if dev.type != "cuda":
            raise _fail(f"the all-to-all runs on a CUDA device, not {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.num_experts = int(num_experts)
        self.topk = int(topk)
        self.hidden = int(hidden)
        self.max_tokens = int(max_tokens)
        self.dispatch_dtype = dispatch_dtype
        self.combine_dtype = combine_dtype
        self.fp8 = dispatch_dtype == torch.float8_e4m3fn
        self.scales_per_token = math.ceil(hidden / SCALE_BLOCK) if self.fp8 else 0
        elem = torch.empty((), dtype=dispatch_dtype).element_size()
        native = MoeAllToAll(
            device=dev.index,
            rank=self.rank,
            world=self.world_size,
            num_experts=self.num_experts,
            topk=self.topk,
            max_tokens=self.max_tokens,
            hidden=self.hidden,
            dispatch_elem_bytes=elem,
            scales_per_token=self.scales_per_token,
            combine_dtype=combine_names[combine_dtype],
            ranks_per_node=ranks_per_node,
            capacity=capacity,
            timeout=float(timeout),
            engine=engine,
        )
        self.timeout = float(timeout)
        layout = native.layout()
        self.capacity: int = layout["capacity"]
        self.experts_per_rank: int = layout["experts_per_rank"]
        mine = bytes(native.handle())
        if exchange is None:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=group)
            handles = [bytes(h) for h in gathered]
        else:
            handles = [bytes(h) for h in exchange(mine)]
        native.connect(handles)
        self._exchange = exchange
        self._key = hashlib.sha1(b"".join(handles)).hexdigest()[:16]
        self._native: Optional[MoeAllToAll] = native
        self._next = 0  # index into _PHASES of the phase the host expects next
        self._graph_tokens = False
        self._ntok = 0
        self._keep: tuple[Any, ...] = ()
        #: Whether the last `dispatch` used the overlapped form.
        self.last_dispatch_overlapped = False
        #: Whether the last `combine` used the overlapped form.
        self.last_combine_overlapped = False

    # -- helpers ---------------------------------------------------------------------------

    def _stream(self) -> int:
        return int(self._torch.cuda.current_stream(self.device).cuda_stream)

    def _nat(self) -> MoeAllToAll:
        if self._native is None:
            raise AllToAllError("the all-to-all was closed")
        return self._native

    def _phase(self, name: str) -> None:
        if self._native is None:
            raise AllToAllError(f"{name}: the all-to-all was closed")
        want = _PHASES[self._next]
        if name != want:
            raise AllToAllError(
                f"{name} called out of order: the next phase of this step is {want} "
                "(each step runs dispatch_send, dispatch_recv, combine_send, combine_recv)"
            )

    def _advance(self) -> None:
        self._next = (self._next + 1) % 4

    def _tensor(
        self,
        name: str,
        t: Any,
        dtypes: Sequence[Any],
        cols: int,
        rows: Optional[int] = None,
        align: int = 16,
    ) -> torch.Tensor:
        torch = self._torch
        if not isinstance(t, torch.Tensor):
            raise _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != self.device:
            raise _fail(f"{name} is on {t.device}; this all-to-all runs on {self.device}")
        if t.dtype not in dtypes:
            allowed = ", ".join(str(d) for d in dtypes)
            raise _fail(f"{name} has dtype {t.dtype}; expected {allowed}")
        if t.dim() != 2 or t.shape[1] != cols:
            raise _fail(f"{name} must have shape [tokens, {cols}], got {list(t.shape)}")
        if rows is not None and t.shape[0] != rows:
            raise _fail(f"{name} must have {rows} rows, got {t.shape[0]}")
        if cols > 1 and t.stride(1) != 1:
            raise _fail(f"{name} must be contiguous along its last dimension")
        row_bytes = t.stride(0) * t.element_size()
        if t.shape[0] > 1 and row_bytes % align != 0:
            raise _fail(f"{name}'s rows must start {align}-byte aligned (row stride {row_bytes})")
        if t.data_ptr() % align != 0:
            raise _fail(f"{name} must start at a {align}-byte aligned address")
        return t

    # -- dispatch --------------------------------------------------------------------------

    def dispatch_send(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: Optional[torch.Tensor] = None,
        num_tokens: Any = None,
        check_routing: bool = False,
    ) -> None:
        """Sends this rank's tokens to the ranks holding their experts.

        Args:
            x: ``[tokens, hidden]`` in the dispatch dtype.
            topk_idx: ``[tokens, topk]`` int32 or int64 expert ids.
            topk_weights: ``[tokens, topk]`` float32 weights (applied in the combine).
            x_scales: ``[tokens, ceil(hidden / 128)]`` float32, for fp8 dispatch only.
            num_tokens: tokens to send: default ``x.shape[0]``; an int up to that; or a
                one-element int32 CUDA tensor read by the kernel (for CUDA graphs; ``x`` must
                then have ``max_tokens`` rows).
            check_routing: check on the host that every expert id is in range before
                anything is sent (synchronises the stream). Without it, the kernel skips an
                out-of-range id and records the error, raised by ``synchronize``/``check``.
        """
        self._phase("dispatch_send")
        args = self._send_args(x, topk_idx, topk_weights, x_scales, num_tokens, check_routing)
        self._nat().dispatch_send(self._stream(), *args)
        self._advance()

    def _send_args(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: Optional[torch.Tensor],
        num_tokens: Any,
        check_routing: bool,
    ) -> tuple[int, int, int, int, int, bool, int, int, int, Optional[int], int]:
        """Checks a dispatch's inputs; the native arguments after the stream. Keeps the
        tensors referenced until the next step."""
        torch = self._torch
        x = self._tensor("x", x, [self.dispatch_dtype], self.hidden)
        n = x.shape[0]
        if n > self.max_tokens:
            raise _fail(
                f"x has {n} tokens; this all-to-all was built for at most {self.max_tokens}"
            )
        idx = self._tensor("topk_idx", topk_idx, [torch.int32, torch.int64], self.topk, n, 1)
        w = self._tensor("topk_weights", topk_weights, [torch.float32], self.topk, n, 1)
        if self.fp8:
            if x_scales is None:
                raise _fail(
                    "fp8 dispatch needs x_scales: [tokens, ceil(hidden / 128)] float32 "
                    "(see stolon.moe.quantize_fp8)"
                )
            sc = self._tensor("x_scales", x_scales, [torch.float32], self.scales_per_token, n, 4)
            s_ptr, s_stride = sc.data_ptr(), sc.stride(0) * 4
        else:
            if x_scales is not None:
                raise _fail("x_scales is only for float8_e4m3fn dispatch")
            sc, s_ptr, s_stride = None, 0, 0
        if check_routing and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_experts:
                bad = lo if lo < 0 else hi
                raise _fail(f"topk_idx names expert {bad}, outside 0..{self.num_experts - 1}")
        ntok_ptr = 0
        if num_tokens is None:
            count: Optional[int] = n
        elif isinstance(num_tokens, torch.Tensor):
            if (
                num_tokens.device != self.device
                or num_tokens.dtype != torch.int32
                or num_tokens.numel() != 1
            ):
                raise _fail("num_tokens as a tensor must be one int32 element on this device")
            if n != self.max_tokens:
                raise _fail(
                    "with num_tokens on the device, x (and the routing) must have max_tokens "
                    f"({self.max_tokens}) rows so any count the kernel reads stays in bounds"
                )
            count, ntok_ptr = None, num_tokens.data_ptr()
        else:
            count = int(num_tokens)
            if not 0 <= count <= n:
                raise _fail(f"num_tokens {count} is outside 0..{n} (the rows of x)")
        args = (
            x.data_ptr(),
            x.stride(0) * x.element_size(),
            s_ptr,
            s_stride,
            idx.data_ptr(),
            idx.dtype == torch.int64,
            idx.stride(0),
            w.data_ptr(),
            w.stride(0),
            count,
            ntok_ptr,
        )
        self._keep = (x, idx, w, sc, num_tokens)
        self._graph_tokens = count is None
        self._ntok = self.max_tokens if count is None else count
        return args

    def dispatch_recv(self, out: Optional[DispatchOutput] = None) -> DispatchOutput:
        """Waits (on the GPU) for every rank's tokens and packs them expert by expert.

        Args:
            out: preallocated outputs (shapes as :class:`DispatchOutput`), e.g. for graphs.
        """
        self._phase("dispatch_recv")
        out = self._outputs(out)
        self._nat().dispatch_recv(self._stream(), *self._output_ptrs(out))
        self._advance()
        return out

    def _outputs(self, out: Optional[DispatchOutput]) -> DispatchOutput:
        """The given dispatch outputs, checked, or new ones."""
        torch = self._torch
        epr = self.experts_per_rank
        if out is None:
            out = DispatchOutput(
                x=torch.empty(
                    (self.capacity, self.hidden), dtype=self.dispatch_dtype, device=self.device
                ),
                scales=torch.empty(
                    (self.capacity, self.scales_per_token), dtype=torch.float32, device=self.device
                )
                if self.fp8
                else None,
                counts=torch.empty(epr, dtype=torch.int32, device=self.device),
                offsets=torch.empty(epr + 1, dtype=torch.int32, device=self.device),
            )
        else:
            self._tensor("out.x", out.x, [self.dispatch_dtype], self.hidden, self.capacity)
            if out.x.stride(0) != self.hidden:
                raise _fail("out.x must be contiguous")
            if self.fp8:
                if out.scales is None or not out.scales.is_contiguous():
                    raise _fail("out.scales must be a contiguous [capacity, scales] tensor")
                self._tensor(
                    "out.scales",
                    out.scales,
                    [torch.float32],
                    self.scales_per_token,
                    self.capacity,
                    4,
                )
            for name, t, size in (("counts", out.counts, epr), ("offsets", out.offsets, epr + 1)):
                if (
                    not isinstance(t, torch.Tensor)
                    or t.device != self.device
                    or t.dtype != torch.int32
                    or t.numel() != size
                    or not t.is_contiguous()
                ):
                    raise _fail(f"out.{name} must be a contiguous int32 [{size}] tensor here")
        return out

    @staticmethod
    def _output_ptrs(out: DispatchOutput) -> tuple[int, int, int, int]:
        scales = out.scales.data_ptr() if out.scales is not None else 0
        return (out.x.data_ptr(), scales, out.counts.data_ptr(), out.offsets.data_ptr())

    def dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        x_scales: Optional[torch.Tensor] = None,
        num_tokens: Any = None,
        out: Optional[DispatchOutput] = None,
        overlap: Optional[bool] = None,
        check_routing: bool = False,
    ) -> DispatchOutput:
        """Both halves of the dispatch (arguments as ``dispatch_send`` and ``dispatch_recv``).

        Args:
            overlap: use the overlapped form, in which each rank expands its own tokens and
                its peers' tokens into the output while its sends are still in flight instead
                of after them (faster at prefill sizes; needs every rank on this node). The
                default (None) overlaps when every rank is on this node and ``max_tokens`` is
                at least 512. The result is the same either way, and ranks may differ.
        """
        self._phase("dispatch_send")
        args = self._send_args(x, topk_idx, topk_weights, x_scales, num_tokens, check_routing)
        out = self._outputs(out)
        self.last_dispatch_overlapped = bool(
            self._nat().dispatch(
                self._stream(),
                *args,
                *self._output_ptrs(out),
                None if overlap is None else bool(overlap),
            )
        )
        self._advance()
        self._advance()
        return out

    # -- combine ---------------------------------------------------------------------------

    def combine_send(self, expert_y: torch.Tensor) -> None:
        """Sends each received token's weighted sum of local expert outputs back to its rank.

        Args:
            expert_y: ``[capacity, hidden]`` in the combine dtype, rows as the dispatch output.
        """
        self._phase("combine_send")
        y = self._tensor("expert_y", expert_y, [self.combine_dtype], self.hidden, self.capacity)
        self._nat().combine_send(self._stream(), y.data_ptr(), y.stride(0) * y.element_size())
        self._keep = (*self._keep, y)
        self._advance()

    def combine_recv(
        self, out: Optional[torch.Tensor] = None, accumulate: bool = False
    ) -> torch.Tensor:
        """Waits (on the GPU) for every rank's partial sums and adds them up per token.

        Args:
            out: ``[tokens, hidden]`` result in the combine dtype (tokens as dispatched, or
                ``max_tokens`` with a device token count); allocated when None.
            accumulate: add into ``out`` instead of overwriting it.
        """
        self._phase("combine_recv")
        out = self._result(out, accumulate)
        self._nat().combine_recv(
            self._stream(), out.data_ptr(), out.stride(0) * out.element_size(), bool(accumulate)
        )
        self._advance()
        return out

    def _result(self, out: Optional[torch.Tensor], accumulate: bool) -> torch.Tensor:
        rows = self._ntok
        if out is None:
            if accumulate:
                raise _fail("accumulate=True needs out=")
            return self._torch.empty(
                (rows, self.hidden), dtype=self.combine_dtype, device=self.device
            )
        need = self.max_tokens if self._graph_tokens else rows
        out = self._tensor("out", out, [self.combine_dtype], self.hidden)
        if out.shape[0] < need:
            raise _fail(f"out has {out.shape[0]} rows; the step dispatched up to {need}")
        return out

    def combine(
        self,
        expert_y: torch.Tensor,
        out: Optional[torch.Tensor] = None,
        accumulate: bool = False,
        overlap: Optional[bool] = None,
    ) -> torch.Tensor:
        """Both halves of the combine (arguments as ``combine_send`` and ``combine_recv``).

        Args:
            overlap: use the overlapped form (one launch), in which each rank sums its own
                tokens while the peers' partial sums of them are still arriving, and its own
                partial sums never go through memory (faster at prefill sizes; needs every
                rank on this node). The default (None) is as for ``dispatch``. The result is
                the same either way, and ranks may differ.
        """
        self._phase("combine_send")
        y = self._tensor("expert_y", expert_y, [self.combine_dtype], self.hidden, self.capacity)
        out = self._result(out, accumulate)
        self.last_combine_overlapped = bool(
            self._nat().combine(
                self._stream(),
                y.data_ptr(),
                y.stride(0) * y.element_size(),
                out.data_ptr(),
                out.stride(0) * out.element_size(),
                bool(accumulate),
                None if overlap is None else bool(overlap),
            )
        )
        self._keep = (*self._keep, y)
        self._advance()
        self._advance()
        return out

    # -- status ----------------------------------------------------------------------------

    def synchronize(self, timeout: Optional[float] = None) -> None:
        """Waits for the current stream, then raises what a kernel recorded (if anything)."""
        limit = self.timeout * 4 + 5 if timeout is None else timeout
        self._nat().synchronize(self._stream(), float(limit))

    def check(self) -> None:
        """Raises what a kernel recorded, without waiting."""
        self._nat().check()

    def steps(self) -> list[int]:
        """Steps each of the four phases completed (reads the device; synchronous)."""
        return list(self._nat().steps())

    def progress(self) -> list[int]:
        """Steps each phase completed, as the kernels last reported them; unlike :meth:`steps`
        it does not touch the stream, so it answers while a phase is stuck."""
        return list(self._nat().progress())

    def footprint(self) -> dict[str, int]:
        """Buffer sizes: the receive area and state this rank allocated, the dispatch output."""
        return dict(self._nat().layout())

    def close(self) -> None:
        """Frees the buffers. Call on every rank, after the stream is idle.

        Peers map this rank's memory, and CUDA forbids freeing it while they do; so close waits
        for the peers' last writes, unmaps their memory, meets every rank (the group's store, or
        a second call of ``exchange``), and only then frees. If the meeting fails (a peer is
        gone or never closes), the memory is left allocated rather than freed under a peer.
        """
        native = self._native
        if native is None:
            return
        self._native = None
        self._keep = ()
        quiet = native.release_peers(self.timeout)
        if quiet and self._meet():
            native.close()
        else:
            _LEAKED.append(native)
            warnings.warn(
                "stolon.moe.AllToAll.close: not every rank reached close in time; its receive "
                "area stays allocated so that no peer writes into freed memory",
                RuntimeWarning,
                stacklevel=2,
            )

    def _meet(self) -> bool:
        """A barrier of all ranks with a deadline (True when everyone arrived)."""
        try:
            if self._exchange is not None:
                self._exchange(b"close")
                return True
            import torch.distributed as dist

            store = dist.distributed_c10d._get_default_store()
            key = f"stolon-moe-close-{self._key}"
            store.add(key, 1)
            deadline = time.monotonic() + self.timeout * 2 + 5
            while store.add(key, 0) < self.world_size:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.002)
            return True
        except Exception:  # any failure to meet: keep the memory (see close)
            return False
