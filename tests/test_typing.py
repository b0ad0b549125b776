"""The stubs match the built package, the package type-checks, and typed usage of the API
type-checks (mypy configuration: pyproject.toml; stubtest allowlist: stubtest_allowlist.txt)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mypy") is None, reason="mypy is not installed"
)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_stubs_match_the_whole_package() -> None:
    r = _run(
        "mypy.stubtest",
        "stolon",
        "--mypy-config-file",
        "pyproject.toml",
        "--allowlist",
        "stubtest_allowlist.txt",
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_stubtest_allowlist_entries_each_give_a_reason() -> None:
    for line in (ROOT / "stubtest_allowlist.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"allowlist entry without a reason: {line!r}"


def test_package_type_checks() -> None:
    r = _run("mypy", "--no-incremental", "-p", "stolon")
    assert r.returncode == 0, r.stdout + r.stderr


def test_typed_usage_type_checks() -> None:
    r = _run("mypy", "--strict", "--no-incremental", "tests/typed_usage.py")
    assert r.returncode == 0, r.stdout + r.stderr
