"""Shared helpers for the engine tests: provider checks, loopback engines, peer processes."""

from __future__ import annotations

import base64
import contextlib
import glob
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

PEER_PY = Path(__file__).resolve().with_name("peer.py")

# benchmarks/ holds helpers the tests share with the benchmarks (procpool: the worker pool).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

#: Socket providers are bound to 127.0.0.1 so every byte stays on loopback.
SOCKET_PROVIDERS = ("tcp", "udp", "net")


def _stolon():
    try:
        import stolon
    except ImportError as e:  # pragma: no cover - depends on the build
        pytest.skip(f"stolon is not importable: {e}")
    return stolon


def require_provider(name: str) -> None:
    """Skips the calling test (printing why) when libfabric or provider `name` is unusable."""
    stolon = _stolon()
    reason = None
    try:
        found = stolon.list_providers(name)
        if not found:
            reason = (
                f"libfabric provider {name!r} is not usable here "
                f"(stolon.list_providers({name!r}) is empty)"
            )
    except stolon.LibraryNotFoundError as e:
        reason = f"libfabric cannot be loaded: {e}"
    if reason is not None:
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)


def engine_kwargs(provider: str, domains: int, **extra: Any) -> dict:
    """Keyword arguments that keep an engine of `provider` on loopback."""
    kw: dict = {}
    if provider in SOCKET_PROVIDERS:
        kw["nodes"] = ["127.0.0.1"] * domains
    kw.update(extra)
    return kw


def make_engine(provider: str, domains: int = 1, **extra: Any):
    require_provider(provider)
    stolon = _stolon()
    return stolon.TransferEngine(provider, domains, **engine_kwargs(provider, domains, **extra))


def scratch_dir(prefix: str = "stolon-tests-") -> str:
    """A fresh directory in RAM (/dev/shm) when there is one, so mapped regions never hit disk."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=prefix, dir=base)


# ------------------------------------------------------------------------------------------------
# peer processes
# ------------------------------------------------------------------------------------------------


class PeerError(AssertionError):
    """A peer command failed; `.error` is the exception class name raised in the child."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message


class PeerProcess:
    """A child process running ``tests/peer.py``: one stolon engine and memory-mapped regions.

    Each region is also mapped read-only here (:meth:`view`), so the parent can check every byte
    the child's engine received without copying it through a pipe.
    """

    def __init__(
        self,
        provider: str,
        domains: int = 1,
        regions: tuple = (1 << 20,),
        engine: Optional[dict] = None,
        start_timeout: float = 60.0,
    ) -> None:
        import numpy as np

        self._np = np
        self.provider = provider
        self.domains = domains
        self.workdir = scratch_dir("stolon-peer-")
        cfg = {
            "provider": provider,
            "domains": domains,
            "engine": engine_kwargs(provider, domains, **(engine or {})),
            "regions": list(regions),
            "workdir": self.workdir,
        }
        self._log_path = os.path.join(self.workdir, "stderr.log")
        self._log = open(self._log_path, "wb")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_PY), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env=env,
            cwd=self.workdir,  # crash reports land with the peer's files, not in the repo
        )
        self._views: dict = {}
        self._lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_id = 0
        self._lock = threading.Lock()
        try:
            hello = self._next_line(start_timeout, "start")
        except BaseException:
            self.close()
            raise
        if not hello.get("ok"):
            self.close()
            raise PeerError(hello.get("error", "?"), hello.get("message", "?"))
        stolon = _stolon()
        self.pid: int = hello["pid"]
        self.address = stolon.Address.from_text(hello["address"])
        self.descriptors = [stolon.MemoryDescriptor.from_text(t) for t in hello["descriptors"]]
        self.files: list[str] = hello["files"]

    # -- plumbing --

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except ValueError:
                self._lines.put({"ok": False, "error": "BadLine", "message": line})
        self._lines.put(None)  # EOF

    def stderr_tail(self, n: int = 3000) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _next_line(self, timeout: float, what: str) -> dict:
        try:
            msg = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"peer {self.provider} pid {self.proc.pid} gave no answer to {what} within "
                f"{timeout}s; stderr:\n{self.stderr_tail()}"
            ) from None
        if msg is None:
            self._lines.put(None)
            raise AssertionError(
                f"peer {self.provider} exited (rc={self.proc.poll()}) during {what}; "
                f"stderr:\n{self.stderr_tail()}"
            )
        return msg

    def submit(self, cmd: str, **args: Any) -> int:
        """Sends a command without waiting; returns its id for :meth:`result`."""
        with self._lock:
            self._next_id += 1
            rid = self._next_id
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
        except OSError as e:  # BrokenPipeError: the child is gone
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            raise AssertionError(
                f"peer {self.provider} pid {self.proc.pid} is gone (rc={self.proc.poll()}, {e}) "
                f"before command {cmd!r}; stderr:\n{self.stderr_tail()}"
            ) from None
        return rid

    def result(self, rid: int, timeout: float = 60.0, raise_error: bool = True) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._next_line(max(deadline - time.monotonic(), 0.0), f"command {rid}")
            if msg.get("id") != rid:
                continue  # a late answer to a command we gave up on
            if raise_error and not msg.get("ok"):
                raise PeerError(msg.get("error", "?"), msg.get("message", "?"))
            return msg

    def call(self, cmd: str, **args: Any) -> dict:
        """Runs a command in the child and returns its reply (raises PeerError on failure).

        ``timeout`` (if given) is the command's own timeout in the child; the reply is awaited
        that long plus a margin."""
        wait = float(args.get("timeout") or 30.0) + 30.0
        return self.result(self.submit(cmd, **args), timeout=wait)

    # -- conveniences --

    def view(self, region: int = 0):
        """A read-only numpy view of the child's region `region` (same pages as the child's)."""
        if region not in self._views:
            np = self._np
            self._views[region] = np.memmap(self.files[region], dtype=np.uint8, mode="r")
        return self._views[region]

    def stats_sum(self, key: str) -> int:
        return sum(d[key] for d in self.call("stats")["stats"])

    def send_messages(self, address, messages: list, timeout: float = 30.0) -> None:
        data = [base64.b64encode(m).decode() for m in messages]
        self.call("send", address=address.to_text(), data=data, timeout=timeout)

    def recv_messages(self, count: int, timeout: float = 30.0) -> list:
        r = self.call("recv", count=count, timeout=timeout)
        return [base64.b64decode(d) for d in r["data"]]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the child gets no chance to clean up (a crashed peer)."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        # A killed shm endpoint cannot remove its shared-memory segment (/dev/shm/<pid>:<n>:<d>).
        for path in glob.glob(f"/dev/shm/{self.proc.pid}:*"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def close(self) -> None:
        if self.alive():
            try:
                self.result(self.submit("exit"), timeout=15.0, raise_error=False)
            except (AssertionError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        for s in (self.proc.stdin, self.proc.stdout):
            try:
                if s is not None:
                    s.close()
            except OSError:
                pass
        self._views.clear()
        self._log.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def spawn_peer(provider: str, domains: int = 1, **kw: Any) -> PeerProcess:
    """Starts a peer process, skipping the test when the provider is unavailable."""
    require_provider(provider)
    return PeerProcess(provider, domains, **kw)


def run_isolated(module: str, func: str, *args: Any, timeout: float = 90.0) -> str:
    """Runs ``tests/<module>.py:<func>(*args)`` in a fresh interpreter and returns its output.

    For scenarios that may crash the engine (a signal): the calling test then fails with the
    signal and the output, instead of the crash taking the whole pytest process down.
    """
    tests = str(Path(__file__).resolve().parent)
    code = (
        f"import json, sys; sys.path.insert(0, {tests!r}); import {module} as m; "
        f"m.{func}(*json.loads(sys.argv[1]))"
    )
    cwd = scratch_dir("stolon-isolated-")  # crash reports (core, *.btr) land here, not in the repo
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"{func} did not finish within {timeout}s (hung); output:\n{out or ''}")
    finally:
        shutil.rmtree(cwd, ignore_errors=True)
    out = (proc.stdout + proc.stderr)[-6000:]
    crash = re.search(r"terminated with signal (\d+)", out)  # a crash handler may exit(1)
    if proc.returncode < 0 or crash:
        num = -proc.returncode if proc.returncode < 0 else int(crash.group(1))
        name = signal.Signals(num).name
        pytest.fail(f"{func}: the process running the engine died with {name}; output:\n{out}")
    if proc.returncode != 0:
        pytest.fail(f"{func} failed (exit {proc.returncode}):\n{out}")
    return out


@pytest.fixture
def peer_factory() -> Iterator:
    """Spawns peer processes for one test and closes (or reaps) them all afterwards."""
    peers: list = []

    def make(provider: str, domains: int = 1, **kw: Any) -> PeerProcess:
        p = spawn_peer(provider, domains, **kw)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()
