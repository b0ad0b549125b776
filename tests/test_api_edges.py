"""Small API edges: the libfabric override, bytes-like descriptors, configuration messages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import make_engine, require_provider

import stolon


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


BOGUS = "/nonexistent/stolon-test/libfabric.so.1"


@pytest.mark.parametrize(
    "call",
    ["stolon.libfabric_info()", "stolon.TransferEngine('tcp')", "stolon.list_providers()"],
)
def test_explicit_libfabric_that_cannot_load_is_an_error(call: str) -> None:
    """STOLON_LIBFABRIC names the library to use: when it cannot be loaded, stolon says so
    (naming the path) instead of quietly using the system's libfabric."""
    require_provider("tcp")  # the system library loads, so a fallback would succeed
    code = (
        "import stolon\n"
        "try:\n"
        f"    {call}\n"
        "except stolon.LibraryNotFoundError as e:\n"
        "    print('RAISED', e)\n"
        "else:\n"
        "    print('NO ERROR')\n"
    )
    r = _run(code, STOLON_LIBFABRIC=BOGUS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("RAISED"), r.stdout
    assert BOGUS in r.stdout
    assert "STOLON_LIBFABRIC" in r.stdout


def test_explicit_libfabric_is_used_and_reported() -> None:
    require_provider("tcp")
    info = stolon.libfabric_info()
    real = info["file"]
    assert os.path.isabs(real) and os.path.isfile(real), info
    assert os.path.realpath(real) == real
    r = _run(
        "import stolon; i = stolon.libfabric_info(); print(i['path']); print(i['file'])",
        STOLON_LIBFABRIC=real,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [real, real]


def test_libfabric_info_reports_the_resolved_file() -> None:
    require_provider("tcp")
    info = stolon.libfabric_info()
    assert os.path.isfile(info["file"])
    assert os.path.basename(info["file"]).startswith("libfabric.so")


@pytest.fixture(scope="module")
def engine():
    eng = make_engine("tcp", 1)
    yield eng
    eng.stop()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_descriptors_from_any_bytes_like(engine, kind) -> None:
    region = engine.register(bytearray(64))
    desc = region.descriptor
    assert stolon.MemoryDescriptor.from_bytes(kind(desc.to_bytes())) == desc
    addr = engine.address
    assert stolon.Address.from_bytes(kind(addr.to_bytes())) == addr


def test_descriptors_from_a_numpy_array() -> None:
    np = pytest.importorskip("numpy")
    eng = make_engine("tcp", 1)
    try:
        raw = eng.address.to_bytes()
        assert stolon.Address.from_bytes(np.frombuffer(raw, dtype=np.uint8)) == eng.address
    finally:
        eng.stop()


@pytest.mark.parametrize("bad", ["text", 5, None, [1, 2]])
def test_descriptors_from_non_bytes_raise_stolon_errors(bad) -> None:
    with pytest.raises(stolon.InvalidArgumentError):
        stolon.MemoryDescriptor.from_bytes(bad)
    with pytest.raises(stolon.InvalidArgumentError):
        stolon.Address.from_bytes(bad)


def test_min_shard_bytes_error_names_the_keyword_and_the_limit() -> None:
    require_provider("tcp")
    with pytest.raises(stolon.ConfigError) as info:
        stolon.TransferEngine("tcp", min_shard_bytes=1000, nodes=["127.0.0.1"]).stop()
    msg = str(info.value)
    assert "min_shard_bytes" in msg and "65536" in msg and "1000" in msg
