"""The demo: a second process writes a buffer into this one; both sides verify it."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import time


def _writer(provider: str, domains: int, size: int, conn) -> None:  # pragma: no cover (child)
    import numpy as np

    from .engine import MemoryDescriptor, TransferEngine, loopback_nodes

    with TransferEngine(provider, domains, nodes=loopback_nodes(provider, domains)) as eng:
        src = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8)
        region = eng.register(src)
        desc = MemoryDescriptor.from_bytes(conn.recv())
        conn.send(hashlib.sha256(src.tobytes()).hexdigest())
        rounds = conn.recv()
        t0 = time.perf_counter()
        futures = [eng.write(region, 0, desc, 0, size, imm=1) for _ in range(rounds)]
        for f in futures:
            f.wait(60)
        conn.send(time.perf_counter() - t0)
        conn.recv()


def run_demo(
    provider: str = "tcp", domains: int = 2, size: int = 64 << 20, rounds: int = 16
) -> int:
    import numpy as np

    from .engine import TransferEngine, loopback_nodes

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_writer, args=(provider, domains, size, child), daemon=True)
    proc.start()
    try:
        with TransferEngine(provider, domains, nodes=loopback_nodes(provider, domains)) as eng:
            dst = np.zeros(size, dtype=np.uint8)
            region = eng.register(dst)
            parent.send(region.descriptor.to_bytes())
            want = parent.recv()
            per_write = eng.imm_count_write(size)
            parent.send(rounds)
            t0 = time.perf_counter()
            eng.wait_imm(1, per_write * rounds, timeout=120)
            elapsed = time.perf_counter() - t0
            parent.recv()
            got = hashlib.sha256(dst.tobytes()).hexdigest()
            parent.send("bye")
            ok = got == want
            gbps = size * rounds / elapsed / 1e9
            print(
                f"stolon demo: {rounds} x {size >> 20} MiB over {provider} x{domains} domains: "
                f"{gbps:.2f} GB/s ({gbps * 8:.1f} Gbit/s), {per_write} immediates per write, "
                f"sha256 {'matches' if ok else 'MISMATCH'}"
            )
            for i, s in enumerate(eng.stats()):
                print(f"  domain {i}: {s['imms_received']} immediates received")
            return 0 if ok else 1
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
