"""The MoE kernel builds a build of stolon carries, and the choice between them (issue 20).

Runs on CPU: the choice is checked for drivers given as version strings, with
``STOLON_MOE_KERNELS`` forcing a build; the GPU tests load the chosen fatbin.
``STOLON_EXPECT_MOE_KERNELS=cuda12,cuda13`` (set by scripts/test.sh, which tests the wheel)
makes the builds present an assertion; ``STOLON_EXPECT_WHEEL=1`` asserts that ``stolon`` is
imported from an installed wheel, not from this checkout.
"""

from __future__ import annotations

import os
import pathlib

import pytest

import stolon
from stolon.__main__ import main
from stolon.errors import CudaUnavailableError, InvalidArgumentError
from stolon.moe.kernels import ENV, kernel_builds, kernel_report, selected_kernels

REPO = pathlib.Path(__file__).resolve().parent.parent

BUILDS = kernel_builds()
needs_builds = pytest.mark.skipif(not BUILDS, reason="built without MoE kernels (no nvcc)")


def _major(b: dict) -> int:
    return int(b["toolkit"].split(".")[0])


def test_expected_builds_are_present():
    want = os.environ.get("STOLON_EXPECT_MOE_KERNELS")
    if want is None:
        pytest.skip("STOLON_EXPECT_MOE_KERNELS not set (scripts/test.sh sets it for the wheel)")
    assert [b["name"] for b in BUILDS] == want.split(",")


def test_imported_from_the_wheel():
    if os.environ.get("STOLON_EXPECT_WHEEL") != "1":
        pytest.skip("STOLON_EXPECT_WHEEL not set (scripts/test.sh sets it for the wheel)")
    here = pathlib.Path(stolon.__file__).resolve()
    assert REPO / "python" not in here.parents, here
    # Installed from a wheel: a dist-info beside the package whose RECORD lists the library.
    records = list(here.parent.parent.glob("stolon-*.dist-info/RECORD"))
    assert len(records) == 1, here
    assert "stolon/_native.abi3.so," in records[0].read_text()


@needs_builds
def test_builds_describe_themselves():
    assert [b["toolkit"] for b in BUILDS] == sorted(
        (b["toolkit"] for b in BUILDS), key=lambda v: tuple(map(int, v.split(".")))
    )
    for b in BUILDS:
        assert b["name"] == f"cuda{_major(b)}"
        assert {"sm_80", "sm_90a"} <= set(b["cubins"])
        if tuple(map(int, b["toolkit"].split("."))) >= (12, 8):
            assert "sm_100a" in b["cubins"]
        assert b["ptx"] == ["compute_80"]
        assert b["bytes"] > 100_000
        assert b["description"].startswith(f"CUDA {b['toolkit']} (sm_80")


@needs_builds
def test_auto_picks_the_newest_build_the_driver_runs(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    newest = BUILDS[-1]
    assert selected_kernels(f"{_major(newest)}.0") == newest["name"]
    assert selected_kernels("99.0") == newest["name"]
    for b in BUILDS:
        # minor version compatibility: a driver of the same major runs the build's cubins
        assert selected_kernels(f"{_major(b)}.2") == b["name"]
    monkeypatch.setenv(ENV, "auto")
    assert selected_kernels("99.0") == newest["name"]


@needs_builds
def test_forcing_each_build(monkeypatch):
    for b in BUILDS:
        monkeypatch.setenv(ENV, b["name"])
        assert selected_kernels("99.0") == b["name"]
        assert selected_kernels(f"{_major(b)}.0") == b["name"]


@needs_builds
def test_forcing_errors_are_typed(monkeypatch):
    monkeypatch.setenv(ENV, "cuda99")
    with pytest.raises(CudaUnavailableError, match="no such build"):
        selected_kernels("13.0")
    newest = BUILDS[-1]
    monkeypatch.setenv(ENV, newest["name"])
    with pytest.raises(CudaUnavailableError, match="supports CUDA 11.8"):
        selected_kernels("11.8")
    for bad in ["13", "cuda", "nvcc13", "CUDA13"]:
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(InvalidArgumentError, match=ENV):
            selected_kernels("13.0")
    monkeypatch.delenv(ENV)
    with pytest.raises(CudaUnavailableError, match="older than every MoE kernel build"):
        selected_kernels("11.8")
    with pytest.raises(InvalidArgumentError, match="driver must look like"):
        selected_kernels("thirteen")


def test_without_a_driver_selection_is_a_typed_error(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    if not BUILDS:
        with pytest.raises(CudaUnavailableError, match="without the MoE kernels"):
            selected_kernels()
        return
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
        pytest.skip("this machine has a CUDA driver")
    except OSError:
        pass
    with pytest.raises(CudaUnavailableError, match="libcuda"):
        selected_kernels()
    # A bad value is reported before the driver is looked for.
    monkeypatch.setenv(ENV, "cuda99")
    with pytest.raises(CudaUnavailableError, match="no such build"):
        selected_kernels()


def test_info_names_the_kernel_builds(capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("MoE kernels:"))
    if BUILDS:
        assert line == "MoE kernels: " + ", ".join(b["description"] for b in BUILDS)
        assert "  loads here: " in out
    else:
        assert "built without nvcc" in line
    report = kernel_report()
    assert report["builds"] == BUILDS
    assert (report["loads"] is None) == ("error" in report)
