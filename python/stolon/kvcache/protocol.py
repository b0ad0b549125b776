"""The control messages between a decode worker and prefill workers (over ``send``/``recv``).

Every message starts with a 12-byte header: ``b"KV"``, a version byte, a type byte and the
sender engine's 64-bit id (``Address.engine_id``), little endian. Three message types:

- :class:`Pages` (decode -> prefill): "here are my pages": request id, the immediate the
  request's writes carry and how many of them decode expects, the destination page indices,
  the descriptors of the decode side's paged cache and tail area, the tail slot offset and size,
  the cache's shape key (:meth:`KVCacheLayout.shape_key`) and geometry (page count, layer /
  tensor / page strides and offset in elements, so the prefill side can address any order), and
  opaque ``meta`` bytes (e.g. the prompt).
- :class:`Done` (prefill -> decode): every write of the request completed on the prefill side;
  the tail's length and the immediates sent.
- :class:`Cancel` (either way): a request is abandoned. ``ack`` marks the prefill side's answer
  (or a cancel the prefill side started); it carries ``imm_sent``, how many immediates of the
  request's writes the prefill side posted in all, or :data:`UNKNOWN` when it cannot tell. The
  decode side frees the request's pages only once that many immediates have arrived (see
  ``docs/kvcache.md``), so a write still in flight can never land in a page that was reused.

Decoding untrusted bytes raises :class:`ProtocolError` for any defect.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Tuple, Union

from ..errors import ProtocolError

__all__ = [
    "VERSION",
    "UNKNOWN",
    "ProtocolError",
    "Pages",
    "Done",
    "Cancel",
    "Message",
    "encode",
    "decode",
]

MAGIC = b"KV"
VERSION = 1
UNKNOWN = 0xFFFFFFFF
"""``Cancel.imm_sent`` when the prefill side cannot tell how many immediates it posted."""

_HEADER = struct.Struct("<2sBBQ")
_PAGES = struct.Struct("<QIIQI8s5QI")
_DONE = struct.Struct("<QII")
_CANCEL = struct.Struct("<QBI")

T_PAGES, T_DONE, T_CANCEL = 1, 2, 3
_MAX_PAGES = 1 << 20


@dataclass(frozen=True)
class Pages:
    """Decode -> prefill: the pages and descriptors one request's KV cache must land in."""

    sender: int
    request_id: int
    imm: int
    expected_imm: int
    tail_offset: int
    tail_bytes: int
    shape_key: bytes
    geometry: Tuple[int, int, int, int, int]
    pages: Tuple[int, ...]
    cache_desc: bytes
    tail_desc: bytes
    meta: bytes = b""


@dataclass(frozen=True)
class Done:
    """Prefill -> decode: all of the request's writes completed on the prefill side."""

    sender: int
    request_id: int
    tail_len: int
    imm_sent: int


@dataclass(frozen=True)
class Cancel:
    """Either way: abandon a request. ``ack``: the prefill side's final word on it."""

    sender: int
    request_id: int
    ack: bool = False
    imm_sent: int = UNKNOWN
    reason: str = field(default="")


Message = Union[Pages, Done, Cancel]


def _blob(b: bytes) -> bytes:
    if len(b) > 0xFFFFFFFF:
        raise ProtocolError("field too large")
    return struct.pack("<I", len(b)) + b


def encode(msg: Message) -> bytes:
    """The bytes of a message."""
    if isinstance(msg, Pages):
        if len(msg.shape_key) != 8:
            raise ProtocolError("shape_key must be 8 bytes")
        body = _PAGES.pack(
            msg.request_id,
            msg.imm,
            msg.expected_imm,
            msg.tail_offset,
            msg.tail_bytes,
            msg.shape_key,
            *msg.geometry,
            len(msg.pages),
        )
        body += struct.pack(f"<{len(msg.pages)}I", *msg.pages)
        body += _blob(msg.cache_desc) + _blob(msg.tail_desc) + _blob(msg.meta)
        kind = T_PAGES
    elif isinstance(msg, Done):
        body, kind = _DONE.pack(msg.request_id, msg.tail_len, msg.imm_sent), T_DONE
    elif isinstance(msg, Cancel):
        body = _CANCEL.pack(msg.request_id, int(msg.ack), msg.imm_sent)
        body += _blob(msg.reason.encode())
        kind = T_CANCEL
    else:
        raise TypeError(f"not a protocol message: {msg!r}")
    return _HEADER.pack(MAGIC, VERSION, kind, msg.sender) + body


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, st: struct.Struct) -> tuple:
        if self.pos + st.size > len(self.data):
            raise ProtocolError("message truncated")
        out = st.unpack_from(self.data, self.pos)
        self.pos += st.size
        return out

    def blob(self) -> bytes:
        (n,) = self.take(struct.Struct("<I"))
        if self.pos + n > len(self.data):
            raise ProtocolError("message truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{len(self.data) - self.pos} trailing bytes")


def decode(data: bytes) -> Message:
    """Parses a message; raises :class:`ProtocolError` on anything malformed."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise ProtocolError("message shorter than its header")
    magic, version, kind, sender = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    r = _Reader(data, _HEADER.size)
    msg: Message
    if kind == T_PAGES:
        rid, imm, exp, toff, tbytes, key, *geo, n = r.take(_PAGES)
        if n > _MAX_PAGES:
            raise ProtocolError(f"{n} pages")
        pages = tuple(r.take(struct.Struct(f"<{n}I")))
        cache, tail, meta = r.blob(), r.blob(), r.blob()
        msg = Pages(sender, rid, imm, exp, toff, tbytes, key, tuple(geo), pages, cache, tail, meta)
    elif kind == T_DONE:
        rid, tail_len, sent = r.take(_DONE)
        msg = Done(sender, rid, tail_len, sent)
    elif kind == T_CANCEL:
        rid, ack, sent = r.take(_CANCEL)
        if ack not in (0, 1):
            raise ProtocolError(f"bad ack flag {ack}")
        try:
            reason = r.blob().decode()
        except UnicodeDecodeError:
            raise ProtocolError("reason is not UTF-8") from None
        msg = Cancel(sender, rid, bool(ack), sent, reason)
    else:
        raise ProtocolError(f"unknown message type {kind}")
    r.end()
    return msg
