"""Long-lived worker processes (spawn) that run a module's `_cmd_*` functions on request.

Shared by the tests and the benchmarks (tests/conftest.py puts this folder on sys.path). Each
worker keeps a `state` dict between commands, so a caller can give it a role (an engine,
registered memory) and drive it step by step. An exception in a worker is sent back and raised
in the parent as `WorkerError`; every wait has a timeout.
"""

from __future__ import annotations

import faulthandler
import importlib
import multiprocessing as mp
import time
import traceback
from typing import Any, List, Optional


def serve(conn: Any, module: str, watchdog: Optional[float] = None) -> None:
    """Worker main: answers `(command, kwargs)` messages until it receives None. With
    `watchdog`, a command still running after that many seconds dumps every thread's stack to
    stderr (it keeps running), so a hang shows where it is."""
    mod = importlib.import_module(module)
    commands = {k[5:]: v for k, v in vars(mod).items() if k.startswith("_cmd_")}
    state: dict = {}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        seq, cmd, kw = msg
        if watchdog:
            faulthandler.dump_traceback_later(watchdog, exit=False)
        try:
            conn.send((seq, "ok", commands[cmd](state, **kw)))
        except BaseException as e:  # reported to the parent, which fails the test
            conn.send((seq, "err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        finally:
            if watchdog:
                faulthandler.cancel_dump_traceback_later()


class WorkerError(RuntimeError):
    """A worker's command raised, or gave no answer in time; the message has its traceback."""


class Pool:
    """`n` workers serving the `_cmd_*` functions of `module`.

    Every command carries a sequence number that its answer echoes: an answer that arrives
    after its caller gave up (a timeout, or a failure of another worker in `all`) is discarded
    rather than taken for the answer to a later command."""

    def __init__(
        self, n: int, module: str, timeout: float, watchdog: Optional[float] = None
    ) -> None:
        ctx = mp.get_context("spawn")
        self.timeout = timeout
        self.conns: List[Any] = []
        self.procs: List[Any] = []
        self.sent: List[int] = [0] * n  # sequence number of the last command sent to worker i
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=serve, args=(b, module, watchdog), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)

    def send(self, i: int, cmd: str, **kw: Any) -> None:
        self.sent[i] += 1
        self.conns[i].send((self.sent[i], cmd, kw))

    def recv(self, i: int, timeout: Optional[float] = None) -> Any:
        """The answer to the last command sent to worker `i` (older answers are dropped)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if not self.conns[i].poll(max(0.0, deadline - time.monotonic())):
                raise WorkerError(f"worker {i} gave no answer in {timeout}s")
            seq, status, res = self.conns[i].recv()
            if seq == self.sent[i]:
                break
        if status != "ok":
            raise WorkerError(f"worker {i}: {res}")
        return res

    def call(self, i: int, cmd: str, **kw: Any) -> Any:
        self.send(i, cmd, **kw)
        return self.recv(i)

    def all(self, idx: List[int], cmd: str, per: Optional[List[dict]] = None, **kw: Any) -> list:
        """Sends `cmd` to every worker in `idx` (with per-worker extra kwargs), then collects
        every answer; the first failure is raised after all workers answered (or timed out)."""
        for k, i in enumerate(idx):
            self.send(i, cmd, **(per[k] if per else {}), **kw)
        out: List[Any] = []
        failure: Optional[WorkerError] = None
        for i in idx:
            try:
                out.append(self.recv(i))
            except WorkerError as e:
                failure = failure or e
        if failure is not None:
            raise failure
        return out

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
