"""The Python face of the transfer engine."""

from __future__ import annotations

from typing import Any, Optional

from . import _native
from ._memory import buffer_address
from ._native import Address, MemoryDescriptor, MemoryRegion, TransferFuture

__all__ = [
    "loopback_nodes",
    "TransferEngine",
    "Address",
    "MemoryDescriptor",
    "MemoryRegion",
    "TransferFuture",
]


SOCKET_PROVIDERS = ("tcp", "net", "udp", "sockets")


def loopback_nodes(provider: str, domains: int) -> Optional[list]:
    """`nodes=` that keep socket providers on 127.0.0.1 (None for the others)."""
    if provider.split(";")[0] in SOCKET_PROVIDERS:
        return ["127.0.0.1"] * domains
    return None


class TransferEngine(_native.TransferEngine):
    """One domain group (1-16 NIC endpoints of one libfabric provider) driven by one worker.

    ``TransferEngine(provider="tcp", domains=2)`` opens two ``tcp;ofi_rxm`` endpoints. Writes
    are one-sided and may carry a 32-bit immediate; receivers count immediates
    (:meth:`wait_imm`), senders wait on the returned :class:`TransferFuture`.
    """

    def register(self, obj: Any, length: Optional[int] = None) -> MemoryRegion:
        """Registers a writable buffer, numpy array, CPU torch tensor, or int pointer (+length).

        The region keeps ``obj`` alive; pass ``region.descriptor`` to peers that write here.
        """
        ptr, nbytes, owner = buffer_address(obj, length)
        return self.register_ptr(ptr, nbytes, owner)
