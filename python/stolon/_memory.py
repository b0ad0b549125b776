"""Turning Python objects (buffers, numpy arrays, torch tensors, raw pointers) into memory."""

from __future__ import annotations

import ctypes
from typing import Any, Optional, Tuple

from .errors import InvalidArgumentError


def cuda_tensor(obj: Any) -> Optional[Tuple[int, int, int]]:
    """(device pointer, bytes, device index) when `obj` is a CUDA torch tensor, else None."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size") and hasattr(obj, "device"):
        if obj.device.type == "cuda":
            if not obj.is_contiguous():
                raise InvalidArgumentError("tensor must be contiguous")
            return obj.data_ptr(), obj.numel() * obj.element_size(), obj.device.index
    return None


def buffer_address(obj: Any, length: Optional[int] = None) -> Tuple[int, int, Any]:
    """Returns (address, length, owner) for `obj` in host memory.

    `owner` must be kept alive while the memory is registered: for buffer-protocol objects it
    holds a buffer export, which also stops the object from being resized.
    """
    if isinstance(obj, int):
        if length is None:
            raise InvalidArgumentError("a raw pointer needs an explicit length")
        if obj <= 0 and length > 0:
            raise InvalidArgumentError("null pointer")
        return obj, int(length), None
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size") and hasattr(obj, "device"):
        # A torch tensor (torch is never imported here).
        if obj.device.type != "cpu":
            raise InvalidArgumentError(f"tensor on {obj.device} is not host memory")
        if not obj.is_contiguous():
            raise InvalidArgumentError("tensor must be contiguous")
        nbytes = obj.numel() * obj.element_size()
        return _check_len(obj.data_ptr(), nbytes, length, obj)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise InvalidArgumentError(
            f"cannot register {type(obj).__name__}: pass a writable buffer (bytearray, numpy "
            "array, memoryview), a CPU torch tensor, or an int pointer with a length"
        ) from None
    if mv.readonly:
        raise InvalidArgumentError(
            f"{type(obj).__name__} is read-only; peers may write into registered memory, so use "
            "a writable buffer such as bytearray"
        )
    if not mv.c_contiguous:
        raise InvalidArgumentError("buffer must be C-contiguous")
    nbytes = mv.nbytes
    if nbytes == 0:
        return _check_len(0, 0, length, mv)
    arr = (ctypes.c_char * nbytes).from_buffer(mv.cast("B"))
    return _check_len(ctypes.addressof(arr), nbytes, length, (arr, mv, obj))


def _check_len(ptr: int, nbytes: int, length: Optional[int], owner: Any) -> Tuple[int, int, Any]:
    if length is None:
        return ptr, nbytes, owner
    if length < 0 or length > nbytes:
        raise InvalidArgumentError(f"length {length} exceeds the object's {nbytes} bytes")
    return ptr, int(length), owner
