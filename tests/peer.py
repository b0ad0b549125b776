"""A stolon engine in a child process, driven by the test process over JSON lines.

Run as ``python tests/peer.py CONFIG_JSON``. CONFIG_JSON holds ``provider``, ``domains``,
``engine`` (extra ``TransferEngine`` keyword arguments), ``regions`` (byte sizes) and ``workdir``.
Every region is a ``np.memmap`` of the file ``workdir/region<i>.bin``, so the parent can map the
same file read-only and compare every byte that landed.

Protocol: the child first prints ``{"ok": true, "hello": true, "address": TEXT,
"descriptors": [TEXT...], "files": [PATH...], "pid": N}``. Then each stdin line is a command
``{"id": N, "cmd": NAME, ...}`` and gets exactly one reply line ``{"id": N, "ok": true, ...}`` or
``{"id": N, "ok": false, "error": CLASS_NAME, "message": TEXT}``. Every wait has a timeout. The
child stops its engine and exits on ``{"cmd": "exit"}`` or when stdin reaches EOF (the parent
went away).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

import stolon

MAX_WAIT = 120.0  # no single command waits longer than this


def _timeout(msg: dict, default: float = 30.0) -> float:
    t = float(msg.get("timeout", default))
    return min(max(t, 0.0), MAX_WAIT)


class Peer:
    def __init__(self, cfg: dict) -> None:
        self.engine = stolon.TransferEngine(
            cfg.get("provider", "tcp"), cfg.get("domains", 1), **cfg.get("engine", {})
        )
        workdir = Path(cfg["workdir"])
        self.files: list[str] = []
        self.bufs: list[np.ndarray] = []
        self.regions: list = []
        for i, size in enumerate(cfg.get("regions", [1 << 20])):
            path = workdir / f"region{i}.bin"
            buf = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(int(size), 1),))
            self.files.append(str(path))
            self.bufs.append(buf)
            self.regions.append(self.engine.register(buf))
        self.expected_lock = threading.Lock()
        self.expect_results: list[dict] = []
        self.messages: list[bytes] = []

    def hello(self) -> dict:
        return {
            "hello": True,
            "address": self.engine.address.to_text(),
            "descriptors": [r.descriptor.to_text() for r in self.regions],
            "files": self.files,
            "pid": os.getpid(),
            "num_domains": self.engine.num_domains,
        }

    # ---- commands -------------------------------------------------------------------------

    def cmd_ping(self, m: dict) -> dict:
        return {}

    def cmd_fill(self, m: dict) -> dict:
        """Fills a region with one byte value, or with random bytes from a seed."""
        buf = self.bufs[m.get("region", 0)]
        if "seed" in m:
            rng = np.random.default_rng(m["seed"])
            buf[:] = rng.integers(0, 256, size=buf.shape[0], dtype=np.uint8)
        else:
            buf[:] = m.get("value", 0)
        return {}

    def cmd_digest(self, m: dict) -> dict:
        """sha256 of the concatenation of (offset, length) ranges of a region (all by default)."""
        buf = self.bufs[m.get("region", 0)]
        h = hashlib.sha256()
        for off, length in m.get("ranges", [[0, buf.shape[0]]]):
            h.update(memoryview(buf[off : off + length]))
        return {"sha256": h.hexdigest()}

    def cmd_imm_count(self, m: dict) -> dict:
        return {"counts": {str(i): self.engine.imm_count(int(i)) for i in m["imms"]}}

    def cmd_wait_imms(self, m: dict) -> dict:
        """Waits for every {imm: count}, then reports what is left counted of each imm."""
        deadline = time.monotonic() + _timeout(m)
        for imm, count in m["imms"].items():
            left = max(deadline - time.monotonic(), 0.0)
            self.engine.wait_imm(int(imm), int(count), timeout=left)
        return {"left": {imm: self.engine.imm_count(int(imm)) for imm in m["imms"]}}

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

    def cmd_stats(self, m: dict) -> dict:
        return {"stats": self.engine.stats()}

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

    def cmd_exit(self, m: dict) -> dict:
        return {}


def _reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    cfg = json.loads(sys.argv[1])
    try:
        peer = Peer(cfg)
    except Exception as e:  # report, so the parent can skip or fail with the reason
        _reply({"ok": False, "hello": True, "error": type(e).__name__, "message": str(e)})
        return 1
    _reply({"ok": True, **peer.hello()})
    told_to_exit = False
    try:
        for line in sys.stdin:
            line = line.strip()
            if not line:
                continue
            msg = json.loads(line)
            name = msg.get("cmd", "")
            handler = getattr(peer, "cmd_" + name, None)
            try:
                if handler is None:
                    raise ValueError(f"unknown command {name!r}")
                result = {"ok": True, **handler(msg)}
            except Exception as e:
                result = {"ok": False, "error": type(e).__name__, "message": str(e)}
            result["id"] = msg.get("id")
            _reply(result)
            if name == "exit":
                told_to_exit = True
                break
    finally:
        peer.engine.stop()
        if not told_to_exit:  # the parent went away: nobody else will remove our files
            shutil.rmtree(cfg["workdir"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
