"""The Python face of the transfer engine."""

from __future__ import annotations

from typing import Any, List, Optional

from . import _native
from ._memory import buffer_address, cuda_tensor
from ._native import Address, MemoryDescriptor, MemoryRegion, TransferFuture
from .errors import InvalidArgumentError

__all__ = [
    "loopback_nodes",
    "TransferEngine",
    "Address",
    "MemoryDescriptor",
    "MemoryRegion",
    "TransferFuture",
]


SOCKET_PROVIDERS = ("tcp", "net", "udp", "sockets")


def loopback_nodes(provider: str, domains: int) -> Optional[List[str]]:
    """`nodes=` that keep socket providers on 127.0.0.1 (None for the others)."""
    if provider.split(";")[0] in SOCKET_PROVIDERS:
        return ["127.0.0.1"] * domains
    return None


class TransferEngine(_native.TransferEngine):
    """One domain group (1-16 NIC endpoints of one libfabric provider) driven by one worker.

    ``TransferEngine(provider="tcp", domains=2)`` opens two ``tcp;ofi_rxm`` endpoints. Writes
    are one-sided and may carry a 32-bit immediate; receivers count immediates
    (:meth:`wait_imm`), senders wait on the returned :class:`TransferFuture`.

    A single write is split over the domains only into shards of at least ``min_shard_bytes``
    (default 1 MiB; at least 65536, else :class:`~stolon.errors.ConfigError`).
    ``max_op_bytes`` (default: the providers' limit; at least 4096) caps one operation.
    Integer arguments out of range (negative, or too large for their type) raise
    :class:`~stolon.errors.InvalidArgumentError`.
    """

    def register(
        self, obj: Any, length: Optional[int] = None, *, staged: bool = False
    ) -> MemoryRegion:
        """Registers memory and returns its region; pass ``region.descriptor`` to peers.

        ``obj`` is a writable buffer, numpy array, CPU torch tensor, int pointer (+ length), or
        a CUDA torch tensor (the engine needs ``cuda_device``; over providers that cannot touch
        GPU memory its bytes move through pinned staging buffers, and a receiver counts an
        immediate only once the bytes sit in GPU memory). The region keeps ``obj`` alive.
        ``staged=True`` makes host memory take the staging path too (a test hook).
        """
        gpu = cuda_tensor(obj)
        if gpu is not None:
            ptr, nbytes, _device = gpu
            if length is not None:
                if not 0 <= length <= nbytes:
                    raise InvalidArgumentError(f"length {length} exceeds the tensor's {nbytes}")
                nbytes = length
            return self.register_gpu_ptr(ptr, nbytes, obj)
        ptr, nbytes, owner = buffer_address(obj, length)
        if staged:
            return self.register_staged_host_ptr(ptr, nbytes, owner)
        return self.register_ptr(ptr, nbytes, owner)
