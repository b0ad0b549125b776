"""An engine in its own process, driven over JSON lines on stdin/stdout.

Used by the multi-NIC tests, benchmarks and soak (engines inside network namespaces) and handy
for poking at a fabric by hand:

    python -m stolon.agent '{"provider": "tcp", "nodes": ["10.77.0.1"], "regions": [1048576],
                             "workdir": "/dev/shm/x"}'

Every region is a file-backed `np.memmap` in `workdir`, so the driving process can map the same
file and check every byte that landed, without copying it through the pipe.

Protocol: the agent prints `{"ok": true, "address": TEXT, "descriptors": [TEXT], "files":
[PATH], "pid": N}` once, then answers each command line `{"cmd": NAME, ...}` with one line
`{"ok": true, ...}` or `{"ok": false, "error": CLASS, "message": TEXT}` (echoing the command's
`id`, if it has one). Every wait is bounded by the command's `timeout` (default 30 s). The agent
exits on `{"cmd": "exit"}` or stdin EOF. `tests/peer.py` extends `Agent` with more commands.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import MemoryDescriptor, TransferEngine, TransferFuture


class Agent:
    def __init__(self, cfg: Dict[str, Any]) -> None:
        kw = dict(cfg.get("engine", {}))
        if cfg.get("nodes"):
            kw["nodes"] = cfg["nodes"]
        domains = len(cfg["nodes"]) if cfg.get("nodes") else cfg.get("domains", 1)
        self.engine = TransferEngine(cfg.get("provider", "tcp"), domains, **kw)
        workdir = Path(cfg["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        self.bufs: List[np.ndarray] = []
        self.regions = []
        self.files = []
        for i, size in enumerate(cfg.get("regions", [1 << 20])):
            path = workdir / f"{os.getpid()}-region{i}.bin"
            buf = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(int(size), 1),))
            self.files.append(str(path))
            self.bufs.append(buf)
            self.regions.append(self.engine.register(buf))

    def hello(self) -> Dict[str, Any]:
        return {
            "hello": True,
            "address": self.engine.address.to_text(),
            "descriptors": [r.descriptor.to_text() for r in self.regions],
            "files": self.files,
            "pid": os.getpid(),
            "num_domains": self.engine.num_domains,
        }

    def cmd_fill(self, m: Dict[str, Any]) -> Dict[str, Any]:
        """Fills a region with random bytes from `seed` (or a constant `value`)."""
        buf = self.bufs[m.get("region", 0)]
        if "seed" in m:
            buf[:] = np.random.default_rng(m["seed"]).integers(0, 256, buf.shape[0], np.uint8)
        else:
            buf[:] = m.get("value", 0)
        buf.flush()
        return {}

    def _submit(self, op: Dict[str, Any]) -> TransferFuture:
        src = self.regions[op.get("region", 0)]
        kw: Dict[str, Any] = {}
        if op.get("pin_domain") is not None:
            kw["pin_domain"] = op["pin_domain"]
        if op.get("timeout") is not None:
            kw["timeout"] = op["timeout"]
        kind = op["kind"]
        imm = op.get("imm")
        if kind == "single":
            dst = MemoryDescriptor.from_text(op["dst"])
            return self.engine.write(src, op["src"], dst, op["dst_off"], op["len"], imm, **kw)
        if kind == "paged":
            dst = MemoryDescriptor.from_text(op["dst"])
            return self.engine.write_paged(
                src,
                dst,
                op["page"],
                op["src_pages"],
                op["dst_pages"],
                src_stride=op.get("src_stride"),
                dst_stride=op.get("dst_stride"),
                src_offset=op.get("src_offset", 0),
                dst_offset=op.get("dst_offset", 0),
                imm=imm,
                **kw,
            )
        if kind == "scatter":
            items = [(MemoryDescriptor.from_text(d), s, o, n) for d, s, o, n in op["items"]]
            return self.engine.scatter(src, items, imm, **kw)
        raise ValueError(f"unknown op kind {kind!r}")

    def cmd_batch(self, m: Dict[str, Any]) -> Dict[str, Any]:
        """Submits `ops` (repeated `repeat` times, at most `window` in flight) and waits for all.
        Returns per-op results: imm_counts or the error, and the elapsed seconds."""
        ops = m["ops"]
        repeat = int(m.get("repeat", 1))
        window = int(m.get("window", 1 << 30))
        t0 = time.perf_counter()
        inflight: List[Any] = []
        results: List[Dict[str, Any]] = [{} for _ in ops]

        def settle(entry: Any) -> None:
            i, fut = entry
            try:
                fut.wait(m.get("timeout", 30.0))
                results[i].setdefault("imm_counts", fut.imm_counts)
            except Exception as e:
                results[i]["error"] = type(e).__name__
                results[i]["message"] = str(e)

        for _ in range(repeat):
            for i, op in enumerate(ops):
                try:
                    inflight.append((i, self._submit(op)))
                except Exception as e:
                    results[i]["error"] = type(e).__name__
                    results[i]["message"] = str(e)
                if len(inflight) >= window:
                    settle(inflight.pop(0))
        for entry in inflight:
            settle(entry)
        return {"results": results, "seconds": time.perf_counter() - t0}

    def cmd_wait_imms(self, m: Dict[str, Any]) -> Dict[str, Any]:
        """Waits until each imm arrived its count (consuming), all within one `timeout`, then
        reports what is left counted of each."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + m.get("timeout", 30.0)
        for imm, count in m["imms"].items():
            left_s = max(deadline - time.monotonic(), 0.0)
            self.engine.wait_imm(int(imm), int(count), timeout=left_s)
        left = {imm: self.engine.imm_count(int(imm)) for imm in m["imms"]}
        return {"left": left, "seconds": time.perf_counter() - t0, "t_end": time.time()}

    def cmd_imm_count(self, m: Dict[str, Any]) -> Dict[str, Any]:
        return {"counts": {str(i): self.engine.imm_count(int(i)) for i in m["imms"]}}

    def cmd_stats(self, m: Dict[str, Any]) -> Dict[str, Any]:
        return {"stats": self.engine.stats()}

    def cmd_exit(self, m: Dict[str, Any]) -> Dict[str, Any]:
        return {}


def _reply(obj: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(
    make: Callable[[Dict[str, Any]], Agent],
    cfg: Dict[str, Any],
    keep_files: bool = False,
    on_abandoned: Optional[Callable[[], None]] = None,
) -> int:
    """Runs an agent made by `make(cfg)` until `exit` or stdin EOF. Replies echo a command's
    `id`. Region files are removed on the way out unless `keep_files` (the driver reads them
    after `exit`); `on_abandoned` runs when stdin ended without `exit` (the driver went away)."""
    try:
        agent = make(cfg)
    except Exception as e:  # reported, so the driver can skip or fail with the reason
        _reply({"ok": False, "hello": True, "error": type(e).__name__, "message": str(e)})
        return 1
    _reply({"ok": True, **agent.hello()})
    told_to_exit = False
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            name = msg.get("cmd", "")
            handler = getattr(agent, "cmd_" + name, None)
            try:
                if handler is None:
                    raise ValueError(f"unknown command {name!r}")
                out = {"ok": True, **handler(msg)}
            except Exception as e:
                out = {"ok": False, "error": type(e).__name__, "message": str(e)}
            if "id" in msg:
                out["id"] = msg["id"]
            _reply(out)
            if name == "exit":
                told_to_exit = True
                break
    finally:
        agent.engine.stop()
        if not keep_files:
            for f in agent.files:
                try:
                    os.unlink(f)
                except OSError:
                    pass
        if not told_to_exit and on_abandoned is not None:
            on_abandoned()
    return 0


def main(argv: List[str]) -> int:
    return serve(Agent, json.loads(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
