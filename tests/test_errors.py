"""Every exception stolon raises is a ``stolon.StolonError``, defined once in ``stolon.errors``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import stolon
import stolon.errors
from stolon import _native


def _package_modules() -> list:
    """stolon and every submodule that imports without optional dependencies (torch)."""
    mods = [stolon]
    for info in pkgutil.walk_packages(stolon.__path__, prefix="stolon."):
        try:
            mods.append(importlib.import_module(info.name))
        except ImportError:
            continue
    return mods


def test_every_exception_class_of_the_package_is_a_stolon_error() -> None:
    outside = []
    for mod in _package_modules():
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("stolon")
                and not issubclass(obj, stolon.StolonError)
            ):
                outside.append(f"{mod.__name__}.{name}")
    assert not outside, f"not under StolonError: {outside}"


def test_every_exception_class_is_defined_once_in_stolon_errors() -> None:
    for mod in _package_modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and issubclass(obj, stolon.StolonError):
                assert obj.__module__ == "stolon.errors", f"{mod.__name__}.{name}"
                assert getattr(stolon.errors, obj.__name__) is obj
                assert obj.__name__ in stolon.errors.__all__


def test_one_layout_error() -> None:
    from stolon.kvcache import LayoutError as KvLayoutError
    from stolon.weights import LayoutError as WeightsLayoutError

    assert KvLayoutError is WeightsLayoutError is stolon.errors.LayoutError
    assert issubclass(stolon.errors.LayoutError, ValueError)
    assert issubclass(stolon.errors.ProtocolError, ValueError)
    assert issubclass(stolon.errors.PlanError, AssertionError)


def test_every_class_the_native_module_raises_exists() -> None:
    names = _native._error_classes()
    assert "CudaError" in names and "CudaUnavailableError" in names
    assert "WriteRejectedError" in names and "AllToAllTimeoutError" in names
    for name in names:
        cls = getattr(stolon.errors, name, None)
        assert cls is not None, name
        assert issubclass(cls, stolon.StolonError), name
        assert name in stolon.errors.__all__


def _gpu_count() -> int:
    info = stolon.cuda_info()
    return len(info["devices"]) if info.get("present") else 0


def test_cuda_errors_of_the_engine_are_cuda_errors() -> None:
    """The engine's CUDA failures are CudaError, like HostCounter's, not a bare StolonError."""
    from conftest import require_provider

    require_provider("tcp")
    if _gpu_count() == 0:
        # No driver or no GPU: both say "CUDA is not usable here".
        with pytest.raises(stolon.CudaUnavailableError):
            stolon.HostCounter(device=0)
        with pytest.raises(stolon.CudaUnavailableError):
            stolon.TransferEngine("tcp", cuda_device=0, nodes=["127.0.0.1"]).stop()
    else:
        bad = _gpu_count() + 100
        with pytest.raises(stolon.CudaError):
            stolon.HostCounter(device=bad)
        with pytest.raises(stolon.CudaError):
            stolon.TransferEngine("tcp", cuda_device=bad, nodes=["127.0.0.1"]).stop()


@pytest.mark.parametrize(
    "make",
    [
        lambda: stolon.HostCounter(value=-1),
        lambda: stolon.HostCounter().set(2**64),
        lambda: stolon.HostCounter().add(-1),
        lambda: stolon.TransferEngine("tcp", domains=-1),
        lambda: stolon.TransferEngine("tcp", min_shard_bytes=-5),
    ],
    ids=["counter-value", "counter-set", "counter-add", "engine-domains", "engine-min-shard"],
)
def test_out_of_range_integers_are_invalid_argument_errors(make) -> None:
    with pytest.raises(stolon.InvalidArgumentError, match="out of range"):
        make()


def test_out_of_range_integers_are_translated_in_the_native_module() -> None:
    """No Python wrapper turns OverflowError into InvalidArgumentError: the native class does."""
    assert stolon.TransferEngine.write is _native.TransferEngine.write
    assert stolon.TransferEngine.register_ptr is _native.TransferEngine.register_ptr
