"""The text formats of the sysfs files :mod:`stolon.topology` reads: CPU lists and PCI addresses.

Kernel cpulists (``"0-3,8-11"``) and hex cpumasks (``"ffffffff,00000001"``), and PCI addresses in
sysfs form (``dddd:bb:dd.f``) or as NVML and users write them. Pure functions, stdlib only; every
public name here is importable from :mod:`stolon.topology`, where it is documented.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "format_cpulist",
    "normalize_pci_address",
    "parse_cpulist",
    "parse_cpumask",
]

_LOOSE_PCI_ADDR_RE = re.compile(
    r"^(?:(?P<dom>[0-9a-f]{1,8}):)?(?P<bus>[0-9a-f]{1,2}):(?P<dev>[0-9a-f]{1,2})\.(?P<fn>[0-7])$",
    re.IGNORECASE,
)


def parse_cpulist(text: str) -> list[int]:
    r"""Parse a kernel cpulist such as ``"0-3,8-11,16"`` into a sorted list of unique CPU ids.

    Whitespace (including the trailing newline sysfs adds) and empty items are ignored, so ``""``
    and ``"\n"`` give ``[]``; overlapping or unordered items are merged. The stride syntax the
    kernel accepts on its command line, ``"0-15:2/4"`` (use the first 2 of every group of 4), is
    supported too.

    Raises:
        ValueError: on a malformed item (``"a"``, ``"3-1"``, ``"-1"``, ``"1-"``...).
    """
    cpus: set[int] = set()
    for raw in text.replace("\n", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        rng, _, stride = item.partition(":")
        lo_s, dash, hi_s = rng.partition("-")
        lo = _parse_cpu_number(lo_s, item)
        hi = _parse_cpu_number(hi_s, item) if dash else lo
        if hi < lo:
            raise ValueError(f"invalid cpulist item {item!r}: range end before start")
        used, group = 1, 1
        if stride:
            used_s, slash, group_s = stride.partition("/")
            if not slash:
                raise ValueError(f"invalid cpulist item {item!r}: expected 'used/group'")
            used = _parse_cpu_number(used_s, item)
            group = _parse_cpu_number(group_s, item)
            if not 0 < used <= group:
                raise ValueError(f"invalid cpulist item {item!r}: need 0 < used <= group")
        for base in range(lo, hi + 1, group):
            cpus.update(range(base, min(base + used, hi + 1)))
    return sorted(cpus)


def _parse_cpu_number(text: str, item: str) -> int:
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"invalid cpulist item {item!r}")
    return int(text)


def format_cpulist(cpus: Iterable[int]) -> str:
    """Format CPU ids as a compact kernel cpulist (``[0, 1, 2, 3, 8]`` -> ``"0-3,8"``).

    The inverse of :func:`parse_cpulist`: ``parse_cpulist(format_cpulist(s)) == sorted(set(s))``.
    """
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def parse_cpumask(text: str) -> list[int]:
    """Parse a kernel hex CPU mask (``"ffffffff,00000001"``, most significant word first).

    This is the format of ``local_cpus`` / ``cpumap`` files, used when a ``*cpulist`` file is
    missing (old kernels).

    Raises:
        ValueError: if the text is not a comma-separated list of hex words.
    """
    words = [w.strip() for w in text.strip().split(",")]
    if not words or any(not w for w in words):
        if text.strip() == "":
            return []
        raise ValueError(f"invalid cpumask {text!r}")
    value = 0
    for word in words:
        value = (value << 32) | int(word, 16)
    return [bit for bit in range(value.bit_length()) if value >> bit & 1]


def normalize_pci_address(address: str) -> str:
    """Normalise a PCI address to sysfs form ``dddd:bb:dd.f`` (lower case).

    Accepts the 8-digit domain NVML/``nvidia-smi`` print (``"00000000:18:00.0"``) and addresses
    without a domain (``"18:00.0"`` -> ``"0000:18:00.0"``).

    Raises:
        ValueError: if ``address`` is not a PCI address.
    """
    m = _LOOSE_PCI_ADDR_RE.match(address.strip())
    if m is None:
        raise ValueError(f"not a PCI address: {address!r}")
    dom = int(m["dom"] or "0", 16)
    return f"{dom:04x}:{int(m['bus'], 16):02x}:{int(m['dev'], 16):02x}.{m['fn']}"


def _pci_sort_key(address: str) -> tuple[int, ...]:
    try:
        dom, bus, devfn = address.split(":")
        dev, fn = devfn.split(".")
        return (int(dom, 16), int(bus, 16), int(dev, 16), int(fn, 16))
    except ValueError:
        return (1 << 62,)
