"""stolon's exception classes, defined once; the native module raises these."""

from __future__ import annotations

__all__ = [
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


class StolonError(Exception):
    """Base class of every error stolon raises."""


class LibraryNotFoundError(StolonError, ImportError):
    """A native library (libfabric, CUDA) could not be loaded; the message lists the paths tried."""


class ProviderNotFoundError(StolonError):
    """No libfabric provider/interface matches the request (see ``python -m stolon info``)."""


class RdmaUnavailableError(ProviderNotFoundError):
    """The libibverbs RC backend (provider ``verbs-rc``) cannot run here: libibverbs is missing,
    or there is no RDMA device or usable port; the message lists what was found."""


class FabricError(StolonError):
    """A libfabric (or libibverbs) call failed."""


class ConfigError(StolonError, ValueError):
    """The engine's configuration is invalid."""


class OutOfBoundsError(StolonError, IndexError):
    """A request touches bytes outside a registered region or a remote descriptor."""


class UnregisteredMemoryError(StolonError):
    """A region was unregistered, or belongs to another engine."""


class DomainMismatchError(StolonError):
    """A descriptor or address does not fit this engine's domains (count or provider)."""


class DecodeError(StolonError, ValueError):
    """Bytes or text could not be decoded into a descriptor or address (corrupt or truncated)."""


class InvalidArgumentError(StolonError, ValueError):
    """Any other bad argument."""


class MessageTooLargeError(StolonError, ValueError):
    """A control message is larger than the peer's receive buffers."""


class TransferError(StolonError):
    """A transfer completed with an error from the fabric (dead peer, broken link)."""


class WriteRejectedError(TransferError):
    """The target refused the write: its region was unregistered or revoked, or the descriptor
    does not match the registration (forged length, unknown key), or a staged chunk fell
    outside it. Nothing was written; the connection and other transfers are unaffected."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A transfer or wait ran past its deadline."""


class EngineStoppedError(StolonError):
    """The engine was stopped while the operation was pending."""


class CudaError(StolonError):
    """A CUDA driver call failed."""


class CudaUnavailableError(CudaError, ImportError):
    """CUDA is not usable here (no driver library, or no GPU); the message says what was tried."""


class AllToAllError(StolonError):
    """The MoE all-to-all failed: ranks disagree, a kernel recorded an error, or it was closed.

    After a kernel error the all-to-all is broken on every rank; build a new one.
    """


class AllToAllTimeoutError(AllToAllError, TimeoutError):
    """An all-to-all kernel waited past its deadline for a peer (dead, or out of step)."""


class LayoutError(StolonError, ValueError):
    """A layout cannot describe valid memory: a KV-cache layout or page table
    (:mod:`stolon.kvcache`), or a weight layout (unknown parameter, overlapping placement, bad
    dtype; :mod:`stolon.weights`)."""


class PlanError(StolonError, AssertionError):
    """A weight-transfer plan does not cover its destinations exactly once (raised by the
    verifiers of :mod:`stolon.weights`)."""


class ProtocolError(StolonError, ValueError):
    """Bytes that are not a valid message of the KV-cache control protocol version."""


class KVStreamError(StolonError):
    """A KV-cache stream failed (bad grant, mismatched counts, protocol violation)."""


class RequestCancelledError(KVStreamError):
    """The request was cancelled (by either side) before it completed."""


class PrefillTimeoutError(TransferTimeoutError):
    """The decode side's wait ran out: the prefill worker is slow, stuck or dead."""


class WeightTransferError(StolonError):
    """A weight update is inconsistent (plan mismatch, wrong stamps, wrong immediate counts)."""
