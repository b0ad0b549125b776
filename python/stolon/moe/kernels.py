"""Which MoE kernel builds this installation carries, and which one loads here.

A wheel embeds one fatbin per CUDA toolkit (CUDA 12.x, built with NVRTC, for R535-R570
drivers; CUDA 13.x, built with nvcc, for R580+), each with cubins for sm_80, sm_90a and
sm_100a plus compute_80 PTX. Creating an :class:`~stolon.moe.AllToAll` loads the newest build
the installed driver supports; ``STOLON_MOE_KERNELS=cuda12`` or ``cuda13`` forces one (a
forced build that is missing, or too new for the driver, raises
:class:`~stolon.errors.CudaUnavailableError`; an unknown value raises
:class:`~stolon.errors.InvalidArgumentError`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

ENV = "STOLON_MOE_KERNELS"


def kernel_builds() -> List[Dict[str, Any]]:
    """The builds in this installation, oldest toolkit first (``[]``: built without nvcc).

    Each is a dict: ``name`` (``cuda12``), ``toolkit`` (``12.8``), ``compiler``, ``cubins``
    (``["sm_80", ...]``), ``ptx`` (``["compute_80"]``), ``bytes``, ``description``.
    """
    from .._native import MoeAllToAll

    return list(MoeAllToAll.kernel_builds())


def selected_kernels(driver: Optional[str] = None) -> str:
    """Name of the build that loads for a driver supporting CUDA ``driver`` (``"12.4"``; default:
    the installed driver), honouring ``STOLON_MOE_KERNELS``. Raises as creating an all-to-all
    would (:class:`~stolon.errors.CudaUnavailableError` without a usable driver or build)."""
    from .._native import MoeAllToAll

    return MoeAllToAll.selected_kernels(driver)


def kernel_report() -> Dict[str, Any]:
    """For ``python -m stolon info``: ``builds``, ``summary`` (one line), and ``loads`` (the name
    of the build that loads here) or ``error`` (why none does). Never raises."""
    from ..errors import StolonError

    builds = kernel_builds()
    out: Dict[str, Any] = {"builds": builds}
    if builds:
        out["summary"] = ", ".join(b["description"] for b in builds)
    else:
        out["summary"] = "none (built without nvcc)"
    try:
        out["loads"] = selected_kernels()
    except StolonError as e:
        out["loads"] = None
        out["error"] = str(e)
    return out
