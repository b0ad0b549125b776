"""The iproute2 plumbing :mod:`netns_testbed` is built from (stdlib only, needs root to act).

Errors, running ``ip``/``tc`` with a timeout, root and tool checks, creating and deleting named
namespaces (ending the processes left in them first), and the tbf sizing of a rate cap. Nothing
here knows what a testbed is; the names ``netns_testbed`` uses are importable from it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

_CMD_TIMEOUT = 20.0  # seconds for any single ip/tc invocation


# --------------------------------------------------------------------------------------------
# errors


class TestbedError(Exception):
    """Base class for testbed errors."""

    __test__ = False  # not a pytest test class


class TestbedUnavailable(TestbedError):
    """The testbed cannot be built on this machine (missing tools, namespace creation failed)."""


class TestbedNeedsRoot(TestbedUnavailable, PermissionError):
    """Raised when not running as root / without CAP_NET_ADMIN."""


_ROOT_MSG = (
    "the netns testbed needs root (CAP_NET_ADMIN) to create network namespaces, veth pairs "
    "and tc qdiscs; run as root (e.g. sudo) or skip"
)


# --------------------------------------------------------------------------------------------
# small helpers


def _run(argv: Sequence[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command, capturing output.  Raises TestbedError with stderr on failure."""
    try:
        cp = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False, **kw
        )
    except FileNotFoundError as e:
        raise TestbedUnavailable(f"command not found: {argv[0]} ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"command timed out after {_CMD_TIMEOUT}s: {' '.join(argv)}") from e
    if check and cp.returncode != 0:
        raise TestbedError(
            f"command failed (rc={cp.returncode}): {' '.join(argv)}: {cp.stderr.strip()}"
        )
    return cp


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedNeedsRoot(_ROOT_MSG)


def _require_tools() -> None:
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise TestbedUnavailable(f"'{tool}' (iproute2) not found in PATH")


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    cp = _run(["ip", "netns", "list"], check=False)
    if cp.returncode != 0:
        return []
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _netns_add(ns: str) -> None:
    cmd = ["ip", "netns", "add", ns]
    cp = _run(cmd, check=False)
    if cp.returncode != 0:
        err = cp.stderr.strip()
        if "Operation not permitted" in err or "Permission denied" in err:
            raise TestbedNeedsRoot(f"{_ROOT_MSG}; `{' '.join(cmd)}` failed: {err}")
        raise TestbedUnavailable(f"`{' '.join(cmd)}` failed (rc={cp.returncode}): {err}")


def _kill_netns_pids(ns: str, grace: float = 2.0) -> None:
    """Terminate every process still inside namespace ``ns`` (SIGTERM, then SIGKILL).

    A namespace with live processes survives ``ip netns del`` (only its name goes away), and
    with it the veths; so processes left in *our* namespaces are ended before deleting them.
    """
    me = {os.getpid(), os.getppid()}

    def pids() -> list[int]:
        cp = _run(["ip", "netns", "pids", ns], check=False)
        if cp.returncode != 0:
            return []
        return [int(p) for p in cp.stdout.split() if p.isdigit() and int(p) not in me]

    left = pids()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            left = pids()
            if not left:
                return
            time.sleep(0.05)


def _netns_delete(ns: str) -> bool:
    """Delete namespace ``ns`` (ending its processes first).  Returns True if it is gone."""
    if ns not in list_netns():
        return True
    _kill_netns_pids(ns)
    _run(["ip", "netns", "del", ns], check=False)
    return ns not in list_netns()


# tbf sizing -------------------------------------------------------------------------------
#
# burst: tbf refills its bucket continuously (hrtimer based), but the dequeue path is driven
#   by softirq/timer wakeups, which on a HZ=250 kernel can be ~4 ms apart.  The bucket must
#   hold at least the bytes the link is allowed to send in one such interval, otherwise the
#   shaper undershoots its rate: burst >= rate_bytes / 250 (4 ms worth).  It must also hold
#   one maximal GSO/TSO super-packet (veth does TSO; 64 KiB), else tbf has to software-segment
#   every skb.  Hence burst = max(rate_bytes / 250, 64 KiB).
# limit: the byte queue behind the bucket.  TCP on a veth has a sub-millisecond base RTT, so a
#   short queue already keeps the link busy; we allow ~10 ms of data at the configured rate
#   (plus the burst), at least 256 KiB.  That keeps the added queueing latency under load at
#   ~10 ms while avoiding tail drops that would make TCP undershoot the cap.
_HZ = 250
_MIN_BURST = 64 * 1024
_QUEUE_SECONDS = 0.010
_MIN_LIMIT = 256 * 1024


def tbf_params(rate_mbit: float) -> dict[str, int]:
    """tbf parameters used for ``rate_mbit`` (Mbit/s = 10^6 bit/s): rate_bit, burst, limit."""
    if rate_mbit <= 0:
        raise ValueError(f"rate must be > 0 Mbit/s, got {rate_mbit}")
    rate_bit = round(rate_mbit * 1_000_000)
    rate_bytes = rate_bit / 8
    burst = max(int(rate_bytes / _HZ), _MIN_BURST)
    limit = max(burst + int(rate_bytes * _QUEUE_SECONDS), _MIN_LIMIT)
    return {"rate_bit": rate_bit, "burst": burst, "limit": limit}


def _normalize_rate(r: float | None) -> float | None:
    if r is None:
        return None
    r = float(r)
    if r < 0:
        raise ValueError(f"rate must be >= 0 Mbit/s (0 or None = uncapped), got {r}")
    return r or None
