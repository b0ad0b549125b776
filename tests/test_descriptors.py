"""Addresses and memory descriptors: exact round trips, and untrusted input is always a
DecodeError (corrupted, truncated, extended, garbage, or a value of the other kind), never a
crash or a wrong value."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from conftest import make_engine, require_provider
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stolon

FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


class Values:
    """Real addresses and descriptors from engines of several providers and domain counts."""

    def __init__(self) -> None:
        self.engines = []
        self.regions = []  # kept: dropping a region unregisters it
        self.addresses = []
        specs = [("tcp", 1), ("tcp", 3)]
        if stolon.list_providers("shm"):
            specs.append(("shm", 2))
        for provider, n in specs:
            eng = make_engine(provider, n)
            self.engines.append(eng)
            self.addresses.append(eng.address)
            for size in (1, 4096, 3 << 20):
                buf = np.zeros(size, dtype=np.uint8)
                self.regions.append(eng.register(buf))
            self.regions.append(eng.register(bytearray(0)))
        self.descriptors = [r.descriptor for r in self.regions]

    def all(self) -> list:
        return [*self.addresses, *self.descriptors]

    def close(self) -> None:
        for e in self.engines:
            e.stop()


@pytest.fixture(scope="module")
def values():
    require_provider("tcp")
    v = Values()
    yield v
    v.close()


def kind(value):
    return type(value)


def test_round_trips(values: Values) -> None:
    for v in values.all():
        cls = kind(v)
        b = v.to_bytes()
        assert isinstance(b, bytes) and bytes(v) == b
        t = v.to_text()
        assert isinstance(t, str) and str(v) == t and t.isascii()
        assert cls.from_bytes(b) == v
        assert cls.from_text(t) == v
        assert cls.from_text(f"  {t}\n") == v  # surrounding whitespace is ignored
        assert pickle.loads(pickle.dumps(v)) == v
        assert pickle.loads(pickle.dumps(v, protocol=2)) == v
        assert hash(cls.from_bytes(b)) == hash(v)
        assert repr(v)


def test_fields(values: Values) -> None:
    for eng in values.engines:
        a = eng.address
        assert a == stolon.Address.from_bytes(a.to_bytes())
        assert len(a.providers) == eng.num_domains
        assert isinstance(a.engine_id, int)
    for d in values.descriptors:
        assert d.address in values.addresses
        assert d.length in (0, 1, 4096, 3 << 20)
    # Distinct values stay distinct, usable as dict keys and in sets.
    everything = values.all()
    assert len(set(everything)) == len(everything)
    assert len({v.to_bytes() for v in everything}) == len(everything)
    assert len({e.address.engine_id for e in values.engines}) == len(values.engines)


def test_an_address_is_not_a_descriptor(values: Values) -> None:
    for a in values.addresses:
        with pytest.raises(stolon.DecodeError):
            stolon.MemoryDescriptor.from_bytes(a.to_bytes())
        with pytest.raises(stolon.DecodeError):
            stolon.MemoryDescriptor.from_text(a.to_text())
    for d in values.descriptors:
        with pytest.raises(stolon.DecodeError):
            stolon.Address.from_bytes(d.to_bytes())
        with pytest.raises(stolon.DecodeError):
            stolon.Address.from_text(d.to_text())
        assert d != d.address


def test_empty_and_prefix_only(values: Values) -> None:
    for cls in (stolon.Address, stolon.MemoryDescriptor):
        for bad in (b"", b"\x00", b"STad", b"STmd", b"STad\x01", b"STmd\x01\x00\x00\x00\x00"):
            with pytest.raises(stolon.DecodeError):
                cls.from_bytes(bad)
        for bad in ("", " ", "stolon-addr1:", "stolon-mem1:", "stolon-mem1:!!!", "x" * 10000):
            with pytest.raises(stolon.DecodeError):
                cls.from_text(bad)


def _decode_error(cls, data) -> None:
    """Decoding must raise DecodeError: not succeed, not raise anything else, not crash."""
    fn = cls.from_bytes if isinstance(data, (bytes, bytearray)) else cls.from_text
    try:
        v = fn(data)
    except stolon.DecodeError:
        return
    except BaseException as e:  # noqa: B036 - a PanicException is a BaseException
        raise AssertionError(f"{type(e).__name__} instead of DecodeError: {e}") from None
    raise AssertionError(f"{len(data)}-long corrupt input decoded to {v!r}")


@FUZZ
@given(data=st.data())
def test_bit_flips_are_detected(values: Values, data) -> None:
    """Flipping any bits of one to four consecutive bytes (a burst the CRC32 always catches)."""
    v = data.draw(st.sampled_from(values.all()), label="value")
    b = bytearray(v.to_bytes())
    at = data.draw(st.integers(0, len(b) - 1), label="position")
    for i in range(at, min(at + data.draw(st.integers(1, 4), label="burst"), len(b))):
        b[i] ^= data.draw(st.integers(1, 255), label="flip")
    _decode_error(kind(v), bytes(b))


@FUZZ
@given(data=st.data())
def test_text_corruption_is_detected(values: Values, data) -> None:
    """Changing one character of the text form (prefix or base64 body)."""
    v = data.draw(st.sampled_from(values.all()), label="value")
    t = list(v.to_text())
    at = data.draw(st.integers(0, len(t) - 1), label="position")
    t[at] = chr(ord(t[at]) ^ data.draw(st.integers(1, 255), label="flip"))
    _decode_error(kind(v), "".join(t))


@FUZZ
@given(data=st.data())
def test_truncated_and_extended_inputs(values: Values, data) -> None:
    v = data.draw(st.sampled_from(values.all()), label="value")
    b = v.to_bytes()
    cut = data.draw(st.integers(0, len(b) - 1), label="cut")
    _decode_error(kind(v), b[:cut])
    _decode_error(kind(v), b[len(b) - cut :] if cut else b[1:])  # front cut off
    extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
    _decode_error(kind(v), b + extra)
    t = v.to_text()
    tcut = data.draw(st.integers(0, len(t) - 1), label="text cut")
    _decode_error(kind(v), t[:tcut])
    _decode_error(kind(v), t + data.draw(st.sampled_from(["A", "AA", "AAAA", "=", "#"])))


@FUZZ
@given(
    junk=st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=300).map(lambda b: b"STad\x01" + b),
        st.binary(max_size=300).map(lambda b: b"STmd\x01" + b),
    ),
    text=st.one_of(
        st.text(max_size=300),
        st.text(max_size=300).map(lambda s: "stolon-addr1:" + s),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_", max_size=300).map(
            lambda s: "stolon-mem1:" + s
        ),
    ),
)
def test_random_garbage(junk: bytes, text: str) -> None:
    for cls in (stolon.Address, stolon.MemoryDescriptor):
        _decode_error(cls, junk)
        _decode_error(cls, text)


def test_decoded_descriptor_is_usable(values: Values) -> None:
    """A descriptor that went through text and pickle still addresses the same memory."""
    require_provider("tcp")
    with make_engine("tcp", 1) as a, make_engine("tcp", 2) as b:
        src = np.arange(4096, dtype=np.uint8)
        dst = np.zeros(4096, dtype=np.uint8)
        rs = a.register(src)
        rd = b.register(dst)  # keep the region: dropping it unregisters the memory
        desc = rd.descriptor
        again = pickle.loads(pickle.dumps(stolon.MemoryDescriptor.from_text(desc.to_text())))
        peer = stolon.Address.from_bytes(b.address.to_bytes())
        f = a.write(rs, 0, again, 0, 4096, 11)
        f.wait(10)
        b.wait_imm(11, f.imm_count, timeout=10)
        a.write_imm(peer, 12).wait(10)
        b.wait_imm(12, 1, timeout=10)
        assert np.array_equal(src, dst)
