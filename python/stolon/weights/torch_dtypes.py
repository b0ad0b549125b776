"""Layout dtype names as torch dtypes, for the torch paths (torch is imported lazily).

Apart from :mod:`.gpu` because :mod:`.slots` needs it for typed views of GPU slots, and the torch
program in :mod:`.gpu` builds on the slot layout: with it here, imports run one way only.
"""

from __future__ import annotations

from typing import Any

from ..errors import WeightTransferError

__all__ = ["torch_dtype"]


def torch_dtype(name: str) -> Any:
    """The torch dtype of a layout dtype name."""
    import torch

    try:
        return {
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "float32": torch.float32,
            "float8_e4m3fn": torch.float8_e4m3fn,
            "uint8": torch.uint8,
        }[name]
    except KeyError:
        raise WeightTransferError(f"no torch dtype for {name!r}") from None
