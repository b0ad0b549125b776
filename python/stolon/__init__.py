"""stolon: portable data movement for large-model inference and training.

One engine moves bytes from registered memory on one machine into registered memory on another
with one-sided writes that carry a 32-bit immediate, over any libfabric provider (EFA, verbs,
tcp, shm, udp), sharded across several NICs. Receivers count immediates; nothing relies on order.
"""

from __future__ import annotations

from . import errors
from ._native import (
    GpuFlag,
    HostCounter,
    PreparedTransfer,
    cuda_info,
    libfabric_info,
    list_providers,
)
from .engine import Address, MemoryDescriptor, MemoryRegion, TransferEngine, TransferFuture
from .errors import (
    AllToAllError,
    AllToAllTimeoutError,
    ConfigError,
    CudaError,
    CudaUnavailableError,
    DecodeError,
    DomainMismatchError,
    EngineStoppedError,
    FabricError,
    InvalidArgumentError,
    KVStreamError,
    LayoutError,
    LibraryNotFoundError,
    MessageTooLargeError,
    OutOfBoundsError,
    PlanError,
    PrefillTimeoutError,
    ProtocolError,
    ProviderNotFoundError,
    RdmaUnavailableError,
    RequestCancelledError,
    StolonError,
    TransferError,
    TransferTimeoutError,
    UnregisteredMemoryError,
    WeightTransferError,
    WriteRejectedError,
)

__all__ = [
    "TransferEngine",
    "TransferFuture",
    "PreparedTransfer",
    "HostCounter",
    "GpuFlag",
    "cuda_info",
    "MemoryRegion",
    "MemoryDescriptor",
    "Address",
    "libfabric_info",
    "list_providers",
    "errors",
    # every class of stolon.errors (spelled out so type checkers see them; stubtest checks
    # that the list matches)
    "StolonError",
    "LibraryNotFoundError",
    "ProviderNotFoundError",
    "RdmaUnavailableError",
    "FabricError",
    "ConfigError",
    "OutOfBoundsError",
    "UnregisteredMemoryError",
    "DomainMismatchError",
    "DecodeError",
    "InvalidArgumentError",
    "MessageTooLargeError",
    "TransferError",
    "WriteRejectedError",
    "TransferTimeoutError",
    "EngineStoppedError",
    "CudaError",
    "CudaUnavailableError",
    "AllToAllError",
    "AllToAllTimeoutError",
    "LayoutError",
    "PlanError",
    "ProtocolError",
    "KVStreamError",
    "RequestCancelledError",
    "PrefillTimeoutError",
    "WeightTransferError",
]
