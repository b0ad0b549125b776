"""The libibverbs RC backend (provider ``verbs-rc``) through Python.

No machine available to the project has an RDMA device, so this checks the one thing that can
run everywhere: choosing the backend without a device raises ``stolon.errors.RdmaUnavailableError``
(a ``ProviderNotFoundError``) whose message says what was found. The backend's integration with
the engine is covered by ``cargo test`` against an in-memory test double of the device layer;
nothing here (or there) has run on RDMA hardware.
"""

from __future__ import annotations

import pytest

import stolon
from stolon.errors import ProviderNotFoundError, RdmaUnavailableError, StolonError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("provider", ["verbs-rc", "ibverbs"])
def test_verbs_rc_without_a_device_raises_a_typed_error_listing_what_was_found(provider):
    try:
        eng = stolon.TransferEngine(provider, 1)
    except RdmaUnavailableError as e:
        err = e
    else:  # pragma: no cover - only on a machine with an active RDMA port
        eng.stop()
        pytest.skip("an RDMA port is usable here")
    assert isinstance(err, ProviderNotFoundError)
    assert isinstance(err, StolonError)
    msg = str(err)
    assert msg.startswith("RDMA (verbs-rc) is not usable here"), msg
    assert f"provider {provider}" in msg, msg
    # What was found: libibverbs (where it was loaded from, or every path tried), the devices.
    assert "libibverbs loaded from" in msg or "libibverbs not found" in msg, msg
    assert "devices: " in msg, msg


def test_the_error_class_is_exported():
    assert stolon.RdmaUnavailableError is RdmaUnavailableError
    assert "RdmaUnavailableError" in stolon.errors.__all__
