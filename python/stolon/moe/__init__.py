"""MoE expert-parallel dispatch and combine (issue 5).

:class:`AllToAll` sends every token to the ranks holding its top-k experts and brings the
weighted expert outputs back, with CUDA kernels that write peer GPU memory directly over
NVLink. Each half is split into a send and a receive phase so other work can run in between,
and the four phases can be captured in a CUDA graph.

- :mod:`~stolon.moe.all_to_all`: :class:`AllToAll`, :class:`DispatchOutput`.
- :mod:`~stolon.moe.reference`: plain torch references (fp8 block quantisation, the rows each
  expert receives, the combined result) that the tests compare against.

See ``docs/moe.md``. torch is imported only when these are used.
"""

from __future__ import annotations

from .all_to_all import SCALE_BLOCK, AllToAll, DispatchOutput
from .reference import (
    FP8_MAX,
    ExpertRows,
    dequantize_fp8,
    expected_rows,
    moe_reference,
    quantize_fp8,
)

__all__ = [
    "AllToAll",
    "DispatchOutput",
    "SCALE_BLOCK",
    "FP8_MAX",
    "ExpertRows",
    "dequantize_fp8",
    "expected_rows",
    "moe_reference",
    "quantize_fp8",
]
