"""Process roles for the GPU checks and benchmarks (tests/test_gpu.py, benchmarks/bench_gpu.py).

A *receiver* process owns a GPU buffer on one device and answers commands over a pipe; the
*writer* side (the calling process) owns a source buffer on another device and drives transfers.
Both sides use torch only to allocate and inspect GPU memory; stolon itself never imports torch.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Dict


def engine(device: int, nvlink: bool, provider: str = "tcp"):
    import stolon
    from stolon.engine import loopback_nodes

    return stolon.TransferEngine(
        provider,
        1,
        nodes=loopback_nodes(provider, 1),
        cuda_device=device,
        nvlink=nvlink,
        max_message_bytes=1 << 20,
        recv_buffers=32,
        send_buffers=32,
    )


def sha(t) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


def _is_vmm(t) -> bool:
    """Whether torch put `t` in an expandable segment (CUDA VMM memory)."""
    import torch

    try:
        for seg in torch.cuda.memory_snapshot():
            if seg["address"] <= t.data_ptr() < seg["address"] + seg["total_size"]:
                return bool(seg.get("is_expandable", False))
    except Exception:
        pass
    return False


def receiver(cfg: Dict[str, Any], conn) -> None:
    """Child: a GPU buffer on cfg['device'] (plus a host buffer), registered; serves commands."""
    import os

    if cfg.get("alloc_conf"):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = cfg["alloc_conf"]
    import numpy as np
    import torch

    import stolon

    torch.cuda.set_device(cfg["device"])
    eng = engine(cfg["device"], cfg["nvlink"], cfg.get("provider", "tcp"))
    dst = torch.zeros(cfg["size"], dtype=torch.uint8, device=f"cuda:{cfg['device']}")
    host = np.zeros(cfg["size"], dtype=np.uint8)
    r = eng.register(dst)
    rh = eng.register(host)
    conn.send(
        (
            r.descriptor.to_bytes(),
            rh.descriptor.to_bytes(),
            eng.address.to_bytes(),
            {"nvlink_note": r.nvlink_note, "vmm": _is_vmm(dst)},
        )
    )
    flag_out = None
    while True:
        cmd = conn.recv()
        op = cmd[0]
        try:
            if op == "expect":
                _, imm, count, timeout = cmd
                eng.wait_imm(imm, count, timeout=timeout)
                conn.send(("ok", time.perf_counter()))
            elif op == "sha":
                _, off, n, which = cmd
                if which == "gpu":
                    torch.cuda.synchronize()
                    conn.send(("ok", sha(dst[off : off + n])))
                else:
                    conn.send(("ok", hashlib.sha256(host[off : off + n].tobytes()).hexdigest()))
            elif op == "zero":
                dst.zero_()
                host[:] = 0
                torch.cuda.synchronize()
                conn.send(("ok", None))
            elif op == "gated_copy":
                # GPU work gated on a completion flag, queued before any data arrives: a
                # stream waits (cuStreamWaitValue64) until the engine sets the flag when `count`
                # immediates have landed, then copies the buffer. No CPU launch after arrival.
                _, imm, count, n, *kind = cmd
                # a host-mapped counter, or a flag in GPU memory set through GDRCopy
                if kind and kind[0] == "gdr":
                    flag = stolon.GpuFlag(cfg["device"])
                else:
                    flag = stolon.HostCounter(device=cfg["device"])
                eng.expect_imm_flag(imm, count, flag, value=1, timeout=60)
                stream = torch.cuda.Stream()
                flag_out = torch.zeros(n, dtype=torch.uint8, device=dst.device)
                flag.wait_on_stream(1, stream.cuda_stream)
                with torch.cuda.stream(stream):
                    flag_out.copy_(dst[:n])
                conn.send(("ok", None))
                stream.synchronize()
                conn.send(("ok", (sha(flag_out), flag.value)))
            elif op == "count":
                conn.send(("ok", eng.imm_count(cmd[1])))
            elif op == "echo":
                # Reflex for latency: every arrival of imm 1 writes `n` bytes back with imm 2.
                _, n, times, peer_desc = cmd
                d = stolon.MemoryDescriptor.from_bytes(peer_desc)
                eng.trigger_write(1, times, r, 0, d, 0, n, reply_imm=2)
                conn.send(("ok", None))
            elif op == "unregister":
                eng.unregister(r)
                conn.send(("ok", None))
            elif op == "victim":
                # A second GPU region, for the revocation check.
                victim = torch.zeros(cfg["size"], dtype=torch.uint8, device=dst.device)
                vr = eng.register(victim)
                conn.send(("ok", (vr.descriptor.to_bytes(), victim.data_ptr())))
            elif op == "revoke_victim":
                # Unregister (returns once no writer can write it), free it, let the caching
                # allocator hand the memory to a new tensor, and paint that with a canary.
                old_ptr = victim.data_ptr()
                before = torch.cuda.memory_allocated(dst.device)
                eng.unregister(vr)
                del vr, victim
                # The region's last handle hands the tensor to the engine's worker, which lets
                # it go once the registration is closed: wait for the allocator to get it back.
                deadline = time.monotonic() + 5
                while torch.cuda.memory_allocated(dst.device) > before - cfg["size"]:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the unregistered tensor was never released")
                    time.sleep(0.001)
                fresh = torch.empty(cfg["size"], dtype=torch.uint8, device=dst.device)
                fresh.fill_(0xCC)
                torch.cuda.synchronize()
                conn.send(("ok", fresh.data_ptr() == old_ptr))
            elif op == "check_fresh":
                torch.cuda.synchronize()
                conn.send(("ok", bool((fresh == 0xCC).all().item())))
            elif op == "stats":
                conn.send(("ok", (eng.stats(), eng.nvlink_stats())))
            elif op == "stop":
                eng.stop()
                conn.send(("ok", None))
                return
        except Exception as e:  # report to the driver instead of dying silently
            conn.send(("error", f"{type(e).__name__}: {e}"))


class Remote:
    """The driver's handle on a receiver process."""

    def __init__(self, cfg: Dict[str, Any]):
        import multiprocessing as mp

        import stolon

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=receiver, args=(cfg, child), daemon=True)
        self.proc.start()
        gpu, host, addr, self.info = self.conn.recv()
        self.gpu_desc = stolon.MemoryDescriptor.from_bytes(gpu)
        self.host_desc = stolon.MemoryDescriptor.from_bytes(host)
        self.address = stolon.Address.from_bytes(addr)

    def call(self, *cmd, timeout: float = 120.0):
        self.conn.send(cmd)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"receiver did not answer {cmd[0]!r}")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def expect(self, imm: int, count: int, timeout: float = 60.0) -> None:
        self.conn.send(("expect", imm, count, timeout))

    def result(self, timeout: float = 120.0):
        if not self.conn.poll(timeout):
            raise TimeoutError("receiver did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        try:
            self.call("stop", timeout=20)
        except Exception:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
