"""A stolon engine in a child process, driven by the test process over JSON lines.

Run as ``python tests/peer.py CONFIG_JSON``. It is ``python -m stolon.agent`` (same config:
``provider``, ``domains``, ``engine`` keyword arguments, ``regions`` byte sizes, ``workdir``;
same protocol and common commands: fill, imm_count, wait_imms, stats, exit) plus the commands
the loopback suites use (write, write_imm, send, recv, barrier, expect_imm, digest, unregister).
Every region is a ``np.memmap`` of a file in ``workdir`` named in the hello line, so the parent
can map it read-only and compare every byte that landed; the files stay after ``exit`` (the
parent removes the workdir) and go with the workdir if the parent disappears. Replies echo each
command's ``id``; every wait has a timeout.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sys
import threading
import time

import stolon
from stolon.agent import Agent, serve

MAX_WAIT = 120.0  # no single command waits longer than this


def _timeout(msg: dict, default: float = 30.0) -> float:
    t = float(msg.get("timeout", default))
    return min(max(t, 0.0), MAX_WAIT)


class Peer(Agent):
    """stolon.agent's engine, regions and common commands, plus what the loopback suites use."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.expected_lock = threading.Lock()
        self.expect_results: list[dict] = []

    # ---- commands -------------------------------------------------------------------------

    def cmd_ping(self, m: dict) -> dict:
        return {}

    def cmd_digest(self, m: dict) -> dict:
        """sha256 of the concatenation of (offset, length) ranges of a region (all by default)."""
        buf = self.bufs[m.get("region", 0)]
        h = hashlib.sha256()
        for off, length in m.get("ranges", [[0, buf.shape[0]]]):
            h.update(memoryview(buf[off : off + length]))
        return {"sha256": h.hexdigest()}

    def cmd_expect_imm(self, m: dict) -> dict:
        tag = m.get("tag")

        def done(exc) -> None:
            with self.expected_lock:
                self.expect_results.append(
                    {"tag": tag, "error": None if exc is None else type(exc).__name__}
                )

        t = m.get("timeout")
        self.engine.expect_imm(int(m["imm"]), int(m["count"]), done, timeout=t)
        return {}

    def cmd_expect_results(self, m: dict) -> dict:
        with self.expected_lock:
            return {"results": list(self.expect_results)}

    def cmd_write(self, m: dict) -> dict:
        """Writes from one of this peer's regions into a descriptor (the parent's memory)."""
        desc = stolon.MemoryDescriptor.from_text(m["dst"])
        kw = {}
        if m.get("pin_domain") is not None:
            kw["pin_domain"] = m["pin_domain"]
        fut = self.engine.write(
            self.regions[m.get("region", 0)],
            m["src_offset"],
            desc,
            m["dst_offset"],
            m["length"],
            m.get("imm"),
            **kw,
        )
        fut.wait(_timeout(m))
        promised = self.engine.imm_count_write(m["length"], **kw)
        return {"imm_count": fut.imm_count, "imm_counts": fut.imm_counts, "promised": promised}

    def cmd_write_imm(self, m: dict) -> dict:
        addr = stolon.Address.from_text(m["address"])
        futs = [self.engine.write_imm(addr, int(m["imm"])) for _ in range(m.get("times", 1))]
        for f in futs:
            f.wait(_timeout(m))
        return {}

    def cmd_send(self, m: dict) -> dict:
        addr = stolon.Address.from_text(m["address"])
        futs = [self.engine.send(addr, base64.b64decode(d)) for d in m["data"]]
        for f in futs:
            f.wait(_timeout(m))
        return {}

    def cmd_recv(self, m: dict) -> dict:
        """Receives `count` messages (all of them or a TransferTimeoutError)."""
        deadline = time.monotonic() + _timeout(m)
        out = []
        for _ in range(m.get("count", 1)):
            left = max(deadline - time.monotonic(), 0.0)
            out.append(base64.b64encode(self.engine.recv(timeout=left)).decode())
        return {"data": out}

    def cmd_barrier(self, m: dict) -> dict:
        addrs = [stolon.Address.from_text(a) for a in m["addresses"]]
        t0 = time.monotonic()
        self.engine.barrier(addrs, int(m["imm"]), timeout=_timeout(m))
        return {"seconds": time.monotonic() - t0}

    def cmd_unregister(self, m: dict) -> dict:
        """Revokes a region but keeps the Python object (and the memory) alive."""
        self.engine.unregister(self.regions[m.get("region", 0)])
        return {"revoked": self.regions[m.get("region", 0)].revoked}


def main() -> int:
    cfg = json.loads(sys.argv[1])
    return serve(
        Peer,
        cfg,
        keep_files=True,  # the test process reads them after exit, then removes the workdir
        on_abandoned=lambda: shutil.rmtree(cfg["workdir"], ignore_errors=True),
    )


if __name__ == "__main__":
    sys.exit(main())
