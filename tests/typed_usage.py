"""Typed use of the public API; type-checked by tests/test_typing.py (never run)."""

from __future__ import annotations

from typing import List, Optional

import stolon


def usage(eng: stolon.TransferEngine, buf: bytearray, peer: stolon.MemoryDescriptor) -> int:
    region: stolon.MemoryRegion = eng.register(buf)
    fut: stolon.TransferFuture = eng.write(region, 0, peer, 0, len(buf), imm=3)
    fut.wait(1.0)
    counts: List[int] = fut.imm_counts
    paged = eng.write_paged(region, peer, 16, [0, 1], [1, 0], imm=4)
    scat = eng.scatter(region, [(peer, 0, 0, 8)], imm=5)
    eng.wait_imm(3, eng.imm_count_write(len(buf)), timeout=2.0)
    addr: stolon.Address = eng.address
    same: stolon.Address = stolon.Address.from_text(addr.to_text())
    desc = stolon.MemoryDescriptor.from_bytes(region.descriptor.to_bytes())
    again = stolon.MemoryDescriptor.from_bytes(bytearray(desc.to_bytes()))
    back = stolon.Address.from_bytes(memoryview(addr.to_bytes()))
    exc: Optional[BaseException] = paged.exception()
    eng.barrier([addr, same, back], 9, 1.0)
    msg: bytes = eng.recv(0.1)
    try:
        eng.send(addr, msg).wait()
    except stolon.TransferTimeoutError:
        pass
    scat.add_done_callback(lambda e: None)
    return sum(counts) + desc.length + again.length + (0 if exc is None else 1)


def context_manager(buf: bytearray) -> bytes:
    with stolon.TransferEngine("tcp", min_shard_bytes=1 << 20) as eng:
        region: stolon.MemoryRegion = eng.register(buf)
        return region.descriptor.to_bytes()


def errors() -> List[type]:
    try:
        stolon.TransferEngine("tcp")
    except stolon.CudaUnavailableError as e:
        return [type(e)]
    except stolon.StolonError:
        pass
    return [stolon.errors.LayoutError, stolon.errors.ProtocolError, stolon.errors.PlanError]
