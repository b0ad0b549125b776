"""Tests for scripts/netns_testbed.py (network-namespace multi-NIC testbed).

They need root + iproute2; otherwise every test except the non-root one is skipped with the
reason from ``netns_testbed.available()``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns_testbed.py"


def _load():
    spec = importlib.util.spec_from_file_location("netns_testbed", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


nt = _load()


@pytest.fixture(scope="module")
def can_build() -> None:
    ok, reason = nt.available()
    if not ok:
        print(f"netns testbed unavailable: {reason}")
        pytest.skip(f"netns testbed unavailable: {reason}")


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_two_links_exist_and_ping(can_build: None) -> None:
    with nt.Testbed(2) as tb:
        assert {tb.ns_a, tb.ns_b} <= _netns()
        assert tb.ns_a != tb.ns_b
        assert [(ln.ip_a, ln.ip_b) for ln in tb.links] == [
            ("10.77.0.1", "10.77.0.2"),
            ("10.77.1.1", "10.77.1.2"),
        ]
        # the addresses really are on the interfaces inside the namespaces
        for side, attr_if, attr_ip in (("a", "if_a", "ip_a"), ("b", "if_b", "ip_b")):
            cp = tb.run_in(
                side, ["ip", "-4", "-j", "addr", "show"], capture_output=True, text=True, check=True
            )
            addrs = {
                (d["ifname"], a["local"])
                for d in json.loads(cp.stdout)
                for a in d.get("addr_info", [])
            }
            assert ("lo", "127.0.0.1") in addrs
            for ln in tb.links:
                assert (getattr(ln, attr_if), getattr(ln, attr_ip)) in addrs
        for i in range(2):
            assert tb.ping(i, "a"), f"link {i} A->B ping failed"
            assert tb.ping(i, "b"), f"link {i} B->A ping failed"
        # node A cannot reach anything but the 10.77.x.x veth subnets
        cp = tb.run_a(
            ["ip", "-4", "-j", "route", "show"], capture_output=True, text=True, check=True
        )
        assert sorted(r["dst"] for r in json.loads(cp.stdout)) == ["10.77.0.0/24", "10.77.1.0/24"]
    assert not {tb.ns_a, tb.ns_b} & _netns()


def test_link_down_and_up(can_build: None) -> None:
    with nt.Testbed(2) as tb:
        assert tb.ping(0) and tb.ping(1)
        tb.link_down(0)
        assert not tb.links[0].up
        assert not tb.ping(0, "a", timeout=0.5), "link 0 still pings A->B while down"
        assert not tb.ping(0, "b", timeout=0.5), "link 0 still pings B->A while down"
        assert tb.ping(1, "a") and tb.ping(1, "b"), "link 1 broken by link 0 going down"
        tb.link_up(0)
        assert tb.links[0].up
        assert tb.ping(0, "a"), "link 0 A->B did not recover after link_up"
        assert tb.ping(0, "b"), "link 0 B->A did not recover after link_up"
        assert tb.ping(1, "a")


def test_teardown_removes_namespaces_even_on_exception(can_build: None) -> None:
    with pytest.raises(RuntimeError, match="boom"), nt.Testbed(1) as tb:
        names = {tb.ns_a, tb.ns_b}
        assert names <= _netns()
        # a process left running inside B must not keep the namespace alive
        sleeper = tb.exec_b(["sleep", "60"])
        # ... nor one started behind the testbed's back (found via `ip netns pids`)
        stray = subprocess.Popen(["ip", "netns", "exec", tb.ns_a, "sleep", "60"])
        raise RuntimeError("boom")
    assert not names & _netns()
    assert sleeper.poll() is not None, "process in the namespace survived teardown"
    assert stray.wait(timeout=5) == -signal.SIGTERM, "untracked process survived teardown"
    tb.teardown()  # idempotent
    assert not tb.is_up
    with pytest.raises(nt.TestbedError):
        tb.exec_a(["true"])


def test_rate_cap_is_enforced(can_build: None) -> None:
    cap = 200.0
    with nt.Testbed(2, rates_mbit=[cap, None]) as tb:
        for side in ("a", "b"):
            assert "tbf" in tb.qdisc(0, side) and "rate 200Mbit" in tb.qdisc(0, side)
            assert "tbf" not in tb.qdisc(1, side)
        m = tb.measure_tcp(0, seconds=1.5)
        print(f"capped link: {m['mbit']:.1f} Mbit/s for cap {cap} Mbit/s")
        assert 0.5 * cap < m["mbit"] < 1.3 * cap, m
        # changing the cap takes effect on both ends; removing it removes the qdisc
        tb.set_rate(0, 50)
        assert "rate 50Mbit" in tb.qdisc(0, "a") and "rate 50Mbit" in tb.qdisc(0, "b")
        tb.set_rate(0, None)
        assert "tbf" not in tb.qdisc(0, "a") and "tbf" not in tb.qdisc(0, "b")


def test_not_root_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _netns() if os.geteuid() == 0 else set()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(nt.TestbedNeedsRoot) as ei:
        nt.Testbed(2)
    assert isinstance(ei.value, PermissionError)
    assert "root" in str(ei.value) and "CAP_NET_ADMIN" in str(ei.value)
    ok, reason = nt.available()
    assert not ok and "root" in reason
    monkeypatch.undo()
    if os.geteuid() == 0:
        assert _netns() == before, "a namespace was created despite the root check"


def test_cli_run_exports_env_and_tears_down(can_build: None) -> None:
    probe = (
        "import json, os, subprocess;"
        "d = json.loads(os.environ['STOLON_TESTBED_JSON']);"
        "links = subprocess.run(['ip', '-j', 'link'], capture_output=True, text=True).stdout;"
        "print(json.dumps({'d': d, 'ifs': [x['ifname'] for x in json.loads(links)],"
        " 'ips_b': os.environ['STOLON_TESTBED_IPS_B']}))"
    )
    cp = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "run",
            "--links",
            "2",
            "--rate",
            "300,",
            "--",
            sys.executable,
            "-c",
            probe,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cp.returncode == 0, cp.stderr
    out = json.loads(cp.stdout.strip().splitlines()[-1])
    assert sorted(out["ifs"]) == ["lo", "stA0", "stA1"]  # the command ran inside node A
    assert out["ips_b"] == "10.77.0.2,10.77.1.2"
    assert [ln["rate_mbit"] for ln in out["d"]["links"]] == [300.0, None]
    assert not {out["d"]["ns_a"], out["d"]["ns_b"]} & _netns()


def test_sigterm_tears_down(can_build: None) -> None:
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import netns_testbed as n;"
        "tb = n.Testbed(1); print(tb.ns_a, tb.ns_b, flush=True); time.sleep(60)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(SCRIPT.parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout is not None
        names = set(p.stdout.readline().split())
        assert len(names) == 2 and names <= _netns()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while names & _netns() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not names & _netns()
