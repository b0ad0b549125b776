#!/usr/bin/env python3
"""Network-namespace testbed: two namespaces joined by 1..4 veth pairs ("emulated NICs").

Layout (N links, i = 0..N-1)::

    netns <prefix><name>-a                      netns <prefix><name>-b
    stA<i>  10.77.<i>.1/24  <==== veth ====>  stB<i>  10.77.<i>.2/24

Each veth pair is its own /24 subnet, so each pair behaves like an independent NIC/path.
An optional per-link rate cap is applied with ``tc ... tbf`` on the egress of *both* ends.

Python API::

    from netns_testbed import Testbed
    with Testbed(2, rates_mbit=[800, 80]) as tb:
        srv = tb.exec_b(["my-server", tb.links[0].ip_b])
        tb.link_down(1)   # simulate a failing NIC
        tb.link_up(1)

Command line::

    netns_testbed.py up --links 3 --rate 1000,1000,100 --name X   # prints JSON, leaves it up
    netns_testbed.py down --name X                                # (or --stale)
    netns_testbed.py run --links 2 --rate 800,80 -- CMD ARGS...   # CMD runs inside node A
    netns_testbed.py check                                        # self-test with ping + TCP
    netns_testbed.py list

Only stdlib; needs root (CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``).  All traffic it
generates stays on the 10.77.x.x veth addresses inside the namespaces it created.

Beside it: ``netns_ops.py`` (errors, ``ip``/``tc`` plumbing, tbf sizing) and ``netns_probes.py``
(the programs run inside the namespaces); their names are importable from here too.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, Self

# The testbed's helper modules sit beside this file. Run as a script, or imported with scripts/
# on sys.path, they are found already; the tests also load this file by its path.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in (os.path.abspath(p or os.curdir) for p in sys.path):
    sys.path.append(_HERE)

from netns_ops import (  # noqa: E402
    _ROOT_MSG,
    TestbedError,
    TestbedNeedsRoot,
    TestbedUnavailable,
    _netns_add,
    _netns_delete,
    _normalize_rate,
    _require_root,
    _require_tools,
    _run,
    list_netns,
    tbf_params,
)
from netns_probes import _PING_SRC, _SINK_SRC, _SOURCE_SRC  # noqa: E402

NS_PREFIX = "stolon-"
MAX_LINKS = 4
SUBNET_FMT = "10.77.{i}.0/24"
IP_A_FMT = "10.77.{i}.1"
IP_B_FMT = "10.77.{i}.2"
IF_A_FMT = "stA{i}"
IF_B_FMT = "stB{i}"
PREFIX_LEN = 24

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")


# --------------------------------------------------------------------------------------------
# cleanup registry (atexit + SIGTERM)

_LIVE: dict[int, Testbed] = {}
_LIVE_LOCK = threading.Lock()
_HANDLERS_INSTALLED = False
_PREV_SIGTERM: Any = None
_SEQ = 0


def _cleanup_all() -> None:
    with _LIVE_LOCK:
        beds = list(_LIVE.values())
    for tb in beds:
        if tb._owner_pid != os.getpid():  # a forked child must not tear down its parent's
            continue
        try:
            tb.teardown()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            print(f"netns_testbed: cleanup of {tb.name} failed: {e}", file=sys.stderr)


def _on_sigterm(signum: int, frame: Any) -> None:
    _cleanup_all()
    prev = _PREV_SIGTERM
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # default disposition: die by SIGTERM, as we would have without the handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED, _PREV_SIGTERM
    if _HANDLERS_INSTALLED:
        return
    atexit.register(_cleanup_all)
    try:
        prev = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
        _PREV_SIGTERM = prev
    except ValueError:  # not the main thread: rely on atexit / __exit__
        pass
    _HANDLERS_INSTALLED = True


# --------------------------------------------------------------------------------------------
# the testbed


@dataclass
class Link:
    """One veth pair = one emulated NIC on each node."""

    index: int
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str
    subnet: str
    rate_mbit: float | None = None
    up: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prefix_len"] = PREFIX_LEN
        d["tbf"] = tbf_params(self.rate_mbit) if self.rate_mbit else None
        return d


class Testbed:
    """Two network namespaces (node A, node B) joined by ``links`` veth pairs.

    Built in the constructor; torn down by :meth:`teardown`, on ``__exit__`` (also after an
    exception), at interpreter exit and on SIGTERM.  ``persist=True`` (used by the CLI ``up``)
    skips the automatic atexit/SIGTERM teardown so the testbed outlives this process.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        links: int,
        rates_mbit: Sequence[float | None] | None = None,
        name: str | None = None,
        *,
        persist: bool = False,
        disable_ipv6: bool = True,
    ) -> None:
        global _SEQ
        if not isinstance(links, int) or not 1 <= links <= MAX_LINKS:
            raise ValueError(f"links must be an int in 1..{MAX_LINKS}, got {links!r}")
        if rates_mbit is None:
            rates: list[float | None] = [None] * links
        else:
            rates = [_normalize_rate(r) for r in rates_mbit]
            if len(rates) == 1 and links > 1:
                rates = rates * links
            if len(rates) != links:
                raise ValueError(f"got {len(rates)} rates for {links} links")
        if name is None:
            _SEQ += 1
            name = f"{os.getpid()}-{_SEQ}"
        if not _NAME_RE.match(name):
            raise ValueError(f"bad testbed name {name!r} (want [A-Za-z0-9_.-], <= 40 chars)")
        self.name = name
        self.ns_a = f"{NS_PREFIX}{name}-a"
        self.ns_b = f"{NS_PREFIX}{name}-b"
        self.links = [
            Link(
                index=i,
                if_a=IF_A_FMT.format(i=i),
                if_b=IF_B_FMT.format(i=i),
                ip_a=IP_A_FMT.format(i=i),
                ip_b=IP_B_FMT.format(i=i),
                subnet=SUBNET_FMT.format(i=i),
                rate_mbit=rates[i],
            )
            for i in range(links)
        ]
        self.persist = persist
        self._owner_pid = os.getpid()
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._state = "building"

        _require_root()
        _require_tools()
        if not persist:
            _install_handlers()
            with _LIVE_LOCK:
                _LIVE[id(self)] = self
        try:
            self._build(disable_ipv6)
        except BaseException:
            self.teardown()
            raise
        self._state = "up"

    # ---- construction ----------------------------------------------------------------------

    def _build(self, disable_ipv6: bool) -> None:
        for ns in (self.ns_a, self.ns_b):
            if ns in list_netns():
                raise TestbedUnavailable(
                    f"namespace {ns} already exists (a testbed named {self.name!r} is up?); "
                    f"remove it with: {sys.argv[0] or 'netns_testbed.py'} down --name {self.name}"
                )
        for ns in (self.ns_a, self.ns_b):
            _netns_add(ns)
            self._created.append(ns)
            if disable_ipv6 and shutil.which("sysctl"):
                # No IPv6 link-local addresses / DAD / MLD chatter: the veths carry only the
                # 10.77.x.x traffic, and interface enumeration sees exactly one address each.
                _run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-q",
                        "-w",
                        "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1",
                    ],
                    check=False,
                )
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        for ln in self.links:
            _run(
                [
                    "ip",
                    "-n",
                    self.ns_a,
                    "link",
                    "add",
                    ln.if_a,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    ln.if_b,
                    "netns",
                    self.ns_b,
                ]
            )
            _run(["ip", "-n", self.ns_a, "addr", "add", f"{ln.ip_a}/{PREFIX_LEN}", "dev", ln.if_a])
            _run(["ip", "-n", self.ns_b, "addr", "add", f"{ln.ip_b}/{PREFIX_LEN}", "dev", ln.if_b])
            _run(["ip", "-n", self.ns_a, "link", "set", ln.if_a, "up"])
            _run(["ip", "-n", self.ns_b, "link", "set", ln.if_b, "up"])
            if ln.rate_mbit:
                self._apply_rate(ln)
        # Carrier/operstate changes propagate asynchronously (linkwatch, up to ~1 s); wait so
        # that users (and interface enumeration that filters on IFF_RUNNING) see UP links.
        for ns, devs in (
            (self.ns_a, [ln.if_a for ln in self.links]),
            (self.ns_b, [ln.if_b for ln in self.links]),
        ):
            if not self._wait_oper(ns, devs, want_up=True):
                raise TestbedError(f"links {devs} in {ns} did not come up")

    def _apply_rate(self, ln: Link) -> None:
        for ns, dev in ((self.ns_a, ln.if_a), (self.ns_b, ln.if_b)):
            if ln.rate_mbit:
                p = tbf_params(ln.rate_mbit)
                _run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "replace",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        f"{p['rate_bit']}bit",
                        "burst",
                        str(p["burst"]),
                        "limit",
                        str(p["limit"]),
                    ]
                )
            else:
                cp = _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)
                if (
                    cp.returncode != 0
                    and "No such file" not in cp.stderr
                    and "Cannot delete qdisc with handle of zero" not in cp.stderr
                ):
                    raise TestbedError(f"tc qdisc del on {ns}/{dev} failed: {cp.stderr.strip()}")

    # ---- context manager -------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.teardown()
        except TestbedError as e:
            if exc_type is None:
                raise
            print(f"netns_testbed: teardown after exception failed: {e}", file=sys.stderr)

    def __repr__(self) -> str:
        return f"Testbed(name={self.name!r}, links={len(self.links)}, state={self._state})"

    # ---- introspection ---------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        return self._state == "up"

    def describe(self) -> dict[str, Any]:
        """JSON-able description (also exported to commands as STOLON_TESTBED_JSON)."""
        return {
            "name": self.name,
            "ns_a": self.ns_a,
            "ns_b": self.ns_b,
            "links": [ln.to_dict() for ln in self.links],
        }

    def env(self) -> dict[str, str]:
        """Environment variables describing the testbed (added to ``run`` commands)."""
        return {
            "STOLON_TESTBED_JSON": json.dumps(self.describe()),
            "STOLON_TESTBED_NAME": self.name,
            "STOLON_TESTBED_NS_A": self.ns_a,
            "STOLON_TESTBED_NS_B": self.ns_b,
            "STOLON_TESTBED_LINKS": str(len(self.links)),
            "STOLON_TESTBED_IPS_A": ",".join(ln.ip_a for ln in self.links),
            "STOLON_TESTBED_IPS_B": ",".join(ln.ip_b for ln in self.links),
            "STOLON_TESTBED_IFS_A": ",".join(ln.if_a for ln in self.links),
            "STOLON_TESTBED_IFS_B": ",".join(ln.if_b for ln in self.links),
            "STOLON_TESTBED_RATES_MBIT": ",".join(
                "" if ln.rate_mbit is None else f"{ln.rate_mbit:g}" for ln in self.links
            ),
        }

    # ---- running things --------------------------------------------------------------------

    def _ns(self, side: str) -> str:
        if side in ("a", "A"):
            return self.ns_a
        if side in ("b", "B"):
            return self.ns_b
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")

    def _argv(self, side: str, argv: Sequence[str] | str) -> list[str]:
        if self._state != "up":
            raise TestbedError(f"testbed {self.name} is not up ({self._state})")
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        return ["ip", "netns", "exec", self._ns(side), *argv]

    def exec_in(
        self, side: str, argv: Sequence[str] | str, **popen_kwargs: Any
    ) -> subprocess.Popen:
        """Start ``argv`` inside namespace ``side`` ('a' or 'b'); a str runs via ``sh -c``.

        The Popen is tracked: a process still running at teardown is terminated (then
        killed), so the namespace really goes away.
        """
        p = subprocess.Popen(self._argv(side, argv), **popen_kwargs)
        self._procs = [q for q in self._procs if q.poll() is None]
        self._procs.append(p)
        return p

    def exec_a(self, argv: Sequence[str] | str, **popen_kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside node A's namespace."""
        return self.exec_in("a", argv, **popen_kwargs)

    def exec_b(self, argv: Sequence[str] | str, **popen_kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside node B's namespace."""
        return self.exec_in("b", argv, **popen_kwargs)

    def run_in(
        self, side: str, argv: Sequence[str] | str, **run_kwargs: Any
    ) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside namespace ``side`` (blocking)."""
        check = run_kwargs.pop("check", False)
        return subprocess.run(self._argv(side, argv), check=check, **run_kwargs)

    def run_a(self, argv: Sequence[str] | str, **run_kwargs: Any) -> subprocess.CompletedProcess:
        return self.run_in("a", argv, **run_kwargs)

    def run_b(self, argv: Sequence[str] | str, **run_kwargs: Any) -> subprocess.CompletedProcess:
        return self.run_in("b", argv, **run_kwargs)

    # ---- link control ----------------------------------------------------------------------

    def _link(self, i: int) -> Link:
        if not 0 <= i < len(self.links):
            raise IndexError(f"link {i} out of range 0..{len(self.links) - 1}")
        if self._state != "up":
            raise TestbedError(f"testbed {self.name} is not up ({self._state})")
        return self.links[i]

    def _wait_oper(self, ns: str, devs: Sequence[str], want_up: bool, timeout: float = 3.0) -> bool:
        """Poll until every interface in ``devs`` has operstate UP (or not UP)."""
        deadline = time.monotonic() + timeout
        while True:
            cp = _run(["ip", "-n", ns, "-j", "link", "show"], check=False)
            try:
                states = {d["ifname"]: d.get("operstate", "") for d in json.loads(cp.stdout)}
            except (ValueError, KeyError, TypeError):
                states = {}
            if all((states.get(dev) == "UP") == want_up for dev in devs):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def link_down(self, i: int) -> None:
        """Take link ``i`` down (A-side interface down; B side then loses carrier)."""
        ln = self._link(i)
        _run(["ip", "-n", self.ns_a, "link", "set", ln.if_a, "down"])
        ln.up = False
        self._wait_oper(self.ns_b, [ln.if_b], want_up=False)

    def link_up(self, i: int) -> None:
        """Bring link ``i`` back; re-adds address, prefix route and tbf if they went missing."""
        ln = self._link(i)
        _run(["ip", "-n", self.ns_a, "link", "set", ln.if_a, "up"])
        _run(["ip", "-n", self.ns_b, "link", "set", ln.if_b, "up"])
        for ns, dev, ip in ((self.ns_a, ln.if_a, ln.ip_a), (self.ns_b, ln.if_b, ln.ip_b)):
            cp = _run(["ip", "-n", ns, "-4", "-j", "addr", "show", "dev", dev])
            addrs = [
                a.get("local")
                for ent in json.loads(cp.stdout or "[]")
                for a in ent.get("addr_info", [])
            ]
            if ip not in addrs:
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", dev])
            cp = _run(["ip", "-n", ns, "-4", "-j", "route", "show", "dev", dev])
            if not any(r.get("dst") == ln.subnet for r in json.loads(cp.stdout or "[]")):
                _run(["ip", "-n", ns, "route", "replace", ln.subnet, "dev", dev, "src", ip])
            if ln.rate_mbit:
                cp = _run(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev])
                if not any(q.get("kind") == "tbf" for q in json.loads(cp.stdout or "[]")):
                    self._apply_rate(ln)
        self._wait_oper(self.ns_a, [ln.if_a], want_up=True)
        self._wait_oper(self.ns_b, [ln.if_b], want_up=True)
        ln.up = True

    def set_rate(self, i: int, mbit: float | None) -> None:
        """Change (or with None/0 remove) the tbf cap of link ``i``, on both ends."""
        ln = self._link(i)
        ln.rate_mbit = _normalize_rate(mbit)
        self._apply_rate(ln)

    def qdisc(self, i: int, side: str = "a") -> str:
        """``tc qdisc show`` of link ``i`` on ``side`` (for diagnostics/tests)."""
        ln = self._link(i)
        dev = ln.if_a if side in ("a", "A") else ln.if_b
        return _run(["tc", "-n", self._ns(side), "qdisc", "show", "dev", dev]).stdout.strip()

    # ---- probes ----------------------------------------------------------------------------

    def ping(self, i: int, src: str = "a", count: int = 1, timeout: float = 1.0) -> bool:
        """ICMP echo over link ``i`` from node ``src`` to the other node; True if all replied."""
        ln = self._link(i)
        s, d = (ln.ip_a, ln.ip_b) if src in ("a", "A") else (ln.ip_b, ln.ip_a)
        cp = self.run_in(
            src,
            [sys.executable, "-c", _PING_SRC, s, d, str(count), str(timeout)],
            capture_output=True,
            text=True,
            timeout=count * timeout + 15,
        )
        return cp.returncode == 0

    def measure_tcp(self, i: int, seconds: float = 2.0, src: str = "a") -> dict[str, float]:
        """One TCP stream over link ``i`` from node ``src`` for ``seconds``, measured at the
        receiver.  Returns ``{"mbit": ..., "bytes": ..., "seconds": ...}``.
        """
        ln = self._link(i)
        dst = "b" if src in ("a", "A") else "a"
        s_ip, d_ip = (ln.ip_a, ln.ip_b) if src in ("a", "A") else (ln.ip_b, ln.ip_a)
        tmo = seconds + 20
        sink = self.exec_in(
            dst,
            [sys.executable, "-c", _SINK_SRC, d_ip, str(tmo)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert sink.stdout is not None
            port_line = sink.stdout.readline().strip()
            if not port_line.isdigit():
                raise TestbedError(f"TCP sink did not start: {port_line!r} {sink.stderr.read()}")
            source = self.run_in(
                src,
                [sys.executable, "-c", _SOURCE_SRC, s_ip, d_ip, port_line, str(seconds)],
                capture_output=True,
                text=True,
                timeout=tmo,
            )
            out, err = sink.communicate(timeout=tmo)
        finally:
            if sink.poll() is None:
                sink.kill()
                sink.wait()
        if source.returncode != 0 or sink.returncode != 0:
            raise TestbedError(
                f"TCP measurement on link {i} failed: source rc={source.returncode} "
                f"{source.stderr.strip()} / sink rc={sink.returncode} {err.strip()}"
            )
        res = json.loads(out.strip().splitlines()[-1])
        secs = res["seconds"] or float("nan")
        return {"mbit": res["bytes"] * 8 / secs / 1e6, "bytes": res["bytes"], "seconds": secs}

    # ---- teardown --------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove both namespaces (and so all veths/qdiscs).  Idempotent; safe to call twice,
        also from signal handlers.  Processes still in the namespaces are ended first.
        """
        if self._state in ("down", "tearing"):
            return
        self._state = "tearing"
        try:
            for p in self._procs:
                if p.poll() is None:
                    p.terminate()
            for p in self._procs:
                try:
                    p.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            self._procs.clear()
            # Deleting node A's namespace destroys the stA* veths, which destroys their stB*
            # peers as well.  Only namespaces this object created are touched (a name clash
            # with an existing testbed must not delete the other one).
            failed = [ns for ns in self._created if not _netns_delete(ns)]
            self._created.clear()
        finally:
            self._state = "down"
            with _LIVE_LOCK:
                _LIVE.pop(id(self), None)
        if failed:
            raise TestbedError(f"could not delete namespace(s) {failed}")


# --------------------------------------------------------------------------------------------
# availability probe


def available() -> tuple[bool, str]:
    """Can a testbed be built here?  Returns ``(ok, reason)``; the reason says why not.

    Checks: effective uid 0, ``ip``/``tc`` present, and a trial namespace with a veth pair and
    a tbf qdisc can be created (and is removed again).
    """
    if os.geteuid() != 0:
        return False, _ROOT_MSG
    try:
        _require_tools()
    except TestbedUnavailable as e:
        return False, str(e)
    ns = f"{NS_PREFIX}probe-{os.getpid()}"
    try:
        _netns_add(ns)
    except TestbedUnavailable as e:
        return False, str(e)
    try:
        steps = [
            ["ip", "-n", ns, "link", "add", "stP0", "type", "veth", "peer", "name", "stP1"],
            [
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                "stP0",
                "root",
                "tbf",
                "rate",
                "100mbit",
                "burst",
                "65536",
                "limit",
                "262144",
            ],
        ]
        for cmd in steps:
            cp = _run(cmd, check=False)
            if cp.returncode != 0:
                return False, f"`{' '.join(cmd)}` failed: {cp.stderr.strip()}"
    finally:
        _netns_delete(ns)
    return True, "ok"


# --------------------------------------------------------------------------------------------
# CLI


def _parse_rates(s: str | None, links: int) -> list[float | None] | None:
    if s is None or s == "":
        return None
    parts = [p.strip().lower() for p in s.split(",")]
    rates: list[float | None] = []
    for p in parts:
        if p in ("", "none", "-", "0", "inf", "unlimited"):
            rates.append(None)
        else:
            rates.append(float(p.removesuffix("mbit")))
    if len(rates) == 1:
        rates *= links
    if len(rates) != links:
        raise SystemExit(f"--rate has {len(rates)} values but --links is {links}")
    return rates


def _cmd_up(a: argparse.Namespace) -> int:
    tb = Testbed(a.links, _parse_rates(a.rate, a.links), a.name, persist=True)
    print(json.dumps(tb.describe(), indent=2))
    print(f"# tear down with: {sys.argv[0]} down --name {tb.name}", file=sys.stderr)
    return 0


def _cmd_down(a: argparse.Namespace) -> int:
    names: list[str] = []
    if a.name:
        names += [f"{NS_PREFIX}{a.name}-a", f"{NS_PREFIX}{a.name}-b"]
    if a.stale:
        pat = re.compile(rf"^{re.escape(NS_PREFIX)}(?:probe-)?(\d+)(?:-\d+)?(?:-[ab])?$")
        for ns in list_netns():
            m = pat.match(ns)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                names.append(ns)
    if not names:
        raise SystemExit("down: give --name NAME and/or --stale")
    rc = 0
    existing = list_netns()
    for ns in names:
        if ns not in existing:
            print(f"{ns}: not present")
            continue
        ok = _netns_delete(ns)
        print(f"{ns}: {'deleted' if ok else 'FAILED to delete'}")
        rc |= 0 if ok else 1
    return rc


def _cmd_list(a: argparse.Namespace) -> int:
    for ns in list_netns():
        if ns.startswith(NS_PREFIX):
            print(ns)
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    cmd = list(a.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SystemExit("run: no command given (use: run [options] -- CMD ARGS...)")
    with Testbed(a.links, _parse_rates(a.rate, a.links), a.name) as tb:
        env = dict(os.environ)
        env.update(tb.env())
        p = tb.exec_a(cmd, env=env)
        try:
            return p.wait()
        except KeyboardInterrupt:
            p.wait()
            return 130


def _cmd_check(a: argparse.Namespace) -> int:
    rates = _parse_rates(a.rate, 2)
    t0 = time.monotonic()
    ok = True
    with Testbed(2, rates, a.name) as tb:
        print(f"testbed {tb.name}: {tb.ns_a} <-> {tb.ns_b}, built in {time.monotonic() - t0:.2f}s")
        for ln in tb.links:
            for src in ("a", "b"):
                good = tb.ping(ln.index, src)
                ok &= good
                s, d = (ln.ip_a, ln.ip_b) if src == "a" else (ln.ip_b, ln.ip_a)
                print(f"link {ln.index} ping {s} -> {d}: {'ok' if good else 'FAILED'}")
        for ln in tb.links:
            m = tb.measure_tcp(ln.index, a.seconds)
            line = (
                f"link {ln.index} TCP {ln.ip_a} -> {ln.ip_b}: {m['mbit']:.1f} Mbit/s "
                f"({m['bytes'] / 1e6:.1f} MB in {m['seconds']:.2f}s)"
            )
            if ln.rate_mbit:
                ratio = m["mbit"] / ln.rate_mbit
                good = 0.5 <= ratio <= 1.3
                ok &= good
                line += (
                    f" vs cap {ln.rate_mbit:g} Mbit/s = {ratio:.2f}x "
                    f"{'ok' if good else 'OUT OF RANGE [0.5, 1.3]'}"
                )
            else:
                line += " (uncapped)"
            print(line)
    gone = not {tb.ns_a, tb.ns_b} & set(list_netns())
    ok &= gone
    print(f"teardown: {'namespaces removed' if gone else 'namespaces LEFT BEHIND'}")
    print("check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Two network namespaces joined by N veth pairs (emulated NICs)."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, links: bool = True) -> None:
        if links:
            p.add_argument("--links", type=int, default=2, help="veth pairs, 1..4 (default 2)")
        p.add_argument(
            "--rate",
            default=None,
            help="Mbit/s cap per link, comma separated (one value = all links; "
            "empty/none/0 = uncapped), e.g. 800,800,80",
        )
        p.add_argument(
            "--name",
            default=None,
            help=f"testbed name; namespaces are {NS_PREFIX}NAME-a/-b (default: <pid>-<seq>)",
        )

    p = sub.add_parser("up", help="build a testbed, print its JSON description, leave it up")
    common(p)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("down", help="delete a testbed left up by 'up'")
    p.add_argument("--name", default=None)
    p.add_argument(
        "--stale",
        action="store_true",
        help="also delete stolon-<pid>-* namespaces whose process is gone",
    )
    p.set_defaults(func=_cmd_down)

    p = sub.add_parser("list", help="list stolon-* namespaces")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("run", help="build, run CMD in node A (env STOLON_TESTBED_*), tear down")
    common(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check", help="self-test: 2 links, ping both ways, TCP rate per link")
    common(p, links=False)
    p.add_argument("--seconds", type=float, default=2.0, help="TCP test time per link")
    p.set_defaults(func=_cmd_check, rate="1000,200")

    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except TestbedUnavailable as e:
        print(f"netns_testbed: {e}", file=sys.stderr)
        return 77 if isinstance(e, TestbedNeedsRoot) else 2


if __name__ == "__main__":
    sys.exit(main())
