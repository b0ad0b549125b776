"""Plain torch references for the MoE all-to-all (any device, CPU included).

Tests compare the kernels against these; they also document exactly what the kernels
compute: which rows each expert receives and in what grouping, the fp8 block quantisation,
and the combine's weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .all_to_all import SCALE_BLOCK

if TYPE_CHECKING:
    import torch

__all__ = [
    "ExpertRows",
    "FP8_MAX",
    "dequantize_fp8",
    "expected_rows",
    "moe_reference",
    "quantize_fp8",
]

#: Largest finite float8_e4m3fn value.
FP8_MAX = 448.0


def quantize_fp8(x: torch.Tensor, block: int = SCALE_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block fp8 e4m3 quantisation: ``x[:, j*block:(j+1)*block] ≈ q * scales[:, j]``.

    Returns ``(q, scales)`` with ``q`` float8_e4m3fn ``[tokens, hidden]`` and ``scales``
    float32 ``[tokens, ceil(hidden / block)]`` (amax / 448; 1 for all-zero blocks).
    """
    import torch

    tokens, hidden = x.shape
    nblocks = -(-hidden // block)
    pad = nblocks * block - hidden
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.view(tokens, nblocks, block)
    amax = blocks.abs().amax(dim=2)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scales.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(tokens, nblocks * block)[:, :hidden].contiguous(), scales.contiguous()


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, block: int = SCALE_BLOCK) -> torch.Tensor:
    """float32 values of an fp8 tensor and its per-block scales."""
    import torch

    tokens, hidden = q.shape
    idx = torch.arange(hidden, device=q.device) // block
    return q.float() * scales[:, idx]


@dataclass
class ExpertRows:
    """What one local expert of a receiving rank gets, as the kernels lay it out."""

    #: Global expert id.
    expert: int
    #: First row in the dispatch output.
    offset: int
    #: For each source rank (in rank order), the set of ``(token, k)`` it sent to this expert.
    by_source: list[set[tuple[int, int]]]

    @property
    def count(self) -> int:
        return sum(len(s) for s in self.by_source)


def expected_rows(
    topk_idx: Sequence[torch.Tensor], num_experts: int, rank: int
) -> list[ExpertRows]:
    """The rows ``rank``'s experts receive, given every rank's ``[tokens, topk]`` routing.

    Rows of local expert ``e`` start at ``sum(count of experts before e)``; inside an expert,
    source ranks come in rank order; inside a source, the order is unspecified (the kernels
    assign positions with atomics), hence sets.
    """
    world = len(topk_idx)
    epr = num_experts // world
    experts = [ExpertRows(rank * epr + le, 0, [set() for _ in range(world)]) for le in range(epr)]
    for src, idx in enumerate(topk_idx):
        rows = idx.detach().to("cpu").tolist()
        for t, row in enumerate(rows):
            for k, e in enumerate(row):
                if e // epr == rank:
                    experts[e % epr].by_source[src].add((t, k))
    offset = 0
    for ex in experts:
        ex.offset = offset
        offset += ex.count
    return experts


def moe_reference(
    xs: Sequence[torch.Tensor],
    topk_idx: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    out_dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Each rank's combine result: ``out[t] = sum_k w[t, k] * expert_fn(idx[t, k], x[t])``.

    ``xs`` are float tensors (dequantise fp8 first); ``expert_fn(e, rows)`` maps rows of
    expert ``e`` to float outputs. Sums run in float32, then cast to ``out_dtype``.
    """
    import torch

    outs = []
    for x, idx, w in zip(xs, topk_idx, topk_weights):
        acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(idx).tolist():
            hit = idx == e  # [tokens, topk]
            tok = hit.any(dim=1).nonzero().flatten()
            if tok.numel() == 0:
                continue
            y = expert_fn(int(e), x[tok].float()).float()
            weight = (w[tok].float() * hit[tok].float()).sum(dim=1, keepdim=True)
            acc[tok] += weight * y
        outs.append(acc.to(out_dtype))
    return outs
