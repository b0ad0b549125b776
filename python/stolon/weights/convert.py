"""Blockwise fp8 (e4m3) quantisation with float32 scales, as DeepSeek-V3 / Kimi-K2 checkpoints use.

A 2-d weight is cut into ``block`` tiles (128 x 128 by default; edge tiles are smaller). Per tile
``amax = max |x|`` and ``scale = amax / 448`` (float32; a tile of zeros gets scale 1). Each
element becomes ``fp8(clip(x / scale, -448, 448))`` with round-to-nearest-even; the clip makes
the cast saturating (``ml_dtypes`` would turn an overflow into NaN). NaN stays NaN. The inference
engine reads ``x ~= float(q) * scale`` (DeepSeek calls the scale tensor ``weight_scale_inv``).

The same arithmetic runs on any subset of elements once the tile scales are known, so a tensor
converted piecewise on many ranks is bit-identical to one converted in one place
(:func:`quantize_blockwise`), which is what the weight-transfer executor relies on: ranks agree on
each tile's amax first (max is exact and order-free), then convert their own pieces.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

__all__ = [
    "FP8_MAX",
    "DEFAULT_BLOCK",
    "fp8_dtype",
    "bf16_dtype",
    "grid_shape",
    "scale_from_amax",
    "block_amax",
    "expand_scales",
    "quantize",
    "quantize_blockwise",
    "dequantize_blockwise",
    "block_ids",
    "amax_by_block",
    "fp8_error_bound",
]

#: Largest finite float8_e4m3fn.
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)


def fp8_dtype() -> np.dtype:
    """numpy dtype of float8_e4m3fn (``ml_dtypes``)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.float8_e4m3fn)


def bf16_dtype() -> np.dtype:
    """numpy dtype of bfloat16 (``ml_dtypes``)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def grid_shape(shape: Sequence[int], block: Tuple[int, int] = DEFAULT_BLOCK) -> Tuple[int, int]:
    """Number of tiles along each dim."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def scale_from_amax(amax: np.ndarray) -> np.ndarray:
    """float32 scales ``amax / 448``; 1 where ``amax == 0``."""
    a = np.asarray(amax, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        return np.where(a > 0, a / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)


def block_amax(x: np.ndarray, block: Tuple[int, int] = DEFAULT_BLOCK) -> np.ndarray:
    """Per-tile ``max |x|`` (float32) of a 2-d array."""
    a = np.abs(np.asarray(x, dtype=np.float32))
    r = np.maximum.reduceat(a, np.arange(0, a.shape[0], block[0]), axis=0)
    return np.maximum.reduceat(r, np.arange(0, a.shape[1], block[1]), axis=1)


def expand_scales(
    scales: np.ndarray, shape: Tuple[int, int], block: Tuple[int, int] = DEFAULT_BLOCK
) -> np.ndarray:
    """Per-element scales of a ``shape`` tensor from its tile scales."""
    s = np.repeat(np.repeat(scales, block[0], axis=0), block[1], axis=1)
    return s[: shape[0], : shape[1]]


def quantize(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``fp8(clip(values / scales, -448, 448))`` elementwise (float32 arithmetic, RNE)."""
    q = np.asarray(values, dtype=np.float32) / np.asarray(scales, dtype=np.float32)
    np.clip(q, -FP8_MAX, FP8_MAX, out=q)
    return q.astype(fp8_dtype())


def quantize_blockwise(
    x: np.ndarray, block: Tuple[int, int] = DEFAULT_BLOCK
) -> Tuple[np.ndarray, np.ndarray]:
    """Reference conversion of a whole 2-d tensor: ``(fp8 values, float32 tile scales)``."""
    if x.ndim != 2:
        raise ValueError(f"blockwise fp8 needs a 2-d tensor, got shape {x.shape}")
    scales = scale_from_amax(block_amax(x, block))
    return quantize(x, expand_scales(scales, x.shape, block)), scales


def dequantize_blockwise(
    q: np.ndarray, scales: np.ndarray, block: Tuple[int, int] = DEFAULT_BLOCK
) -> np.ndarray:
    """float32 ``q * scale``."""
    return q.astype(np.float32) * expand_scales(scales, q.shape, block)


def fp8_error_bound(x: np.ndarray, scales_per_element: np.ndarray) -> np.ndarray:
    """Largest round-trip error the conversion may make per element: half an fp8 ulp.

    e4m3 keeps 3 mantissa bits, so a normal value is off by at most ``|x| * 2**-4``; below the
    smallest normal (``2**-6 * scale``) the step is the subnormal ``2**-9 * scale``.
    """
    ax = np.abs(np.asarray(x, dtype=np.float64))
    s = np.asarray(scales_per_element, dtype=np.float64)
    return np.maximum(ax * 2.0**-4, s * 2.0**-10)


def block_ids(
    rows: np.ndarray, cols: np.ndarray, grid_cols: int, block: Tuple[int, int] = DEFAULT_BLOCK
) -> np.ndarray:
    """Row-major tile index of element ``(rows, cols)`` in a grid ``grid_cols`` tiles wide."""
    return (rows // block[0]) * grid_cols + cols // block[1]


def amax_by_block(values: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """``out[id] = max(out[id], |value|)`` for every element (``out`` is a flat float32 grid).

    Elements of one tile come in runs (rows of a tile are contiguous), so the maxima are taken
    per run with ``reduceat`` first and only the run maxima are scattered.
    """
    v = np.abs(np.asarray(values, dtype=np.float32)).reshape(-1)
    ids = ids.reshape(-1)
    if v.size == 0:
        return
    starts = np.concatenate(([0], np.flatnonzero(ids[1:] != ids[:-1]) + 1))
    np.maximum.at(out, ids[starts], np.maximum.reduceat(v, starts))
