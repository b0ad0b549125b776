"""KV-cache streaming for disaggregated prefill and decode (issue 6).

A prefill worker streams each request's paged KV cache into a decode worker's paged cache layer
by layer while prefill still runs, then one tail write (first token, lengths, request id, an
optional payload such as the last hidden state); the decode worker learns from an immediate
count known in advance that everything landed.

- :mod:`~stolon.kvcache.layout`: :class:`KVCacheLayout` (layers x tensors x pages, layer- or
  page-major or any strides, MLA latents) and the paged writes of one layer.
- :mod:`~stolon.kvcache.protocol`: the control messages (pages / done / cancel).
- :mod:`~stolon.kvcache.stream`: :class:`PrefillWorker` / :class:`PrefillStream` and
  :class:`DecodeReceiver`.

See ``docs/kvcache.md``.
"""

from __future__ import annotations

from .layout import LAYER_MAJOR, PAGE_MAJOR, KVCacheLayout, LayoutError, PagedWrite
from .protocol import Cancel, Done, Pages, ProtocolError
from .stream import (
    DecodeReceiver,
    KVStreamError,
    PrefillStream,
    PrefillTimeoutError,
    PrefillWorker,
    RequestCancelledError,
    Tail,
)

__all__ = [
    "LAYER_MAJOR",
    "PAGE_MAJOR",
    "KVCacheLayout",
    "LayoutError",
    "PagedWrite",
    "Pages",
    "Done",
    "Cancel",
    "ProtocolError",
    "PrefillWorker",
    "PrefillStream",
    "DecodeReceiver",
    "Tail",
    "KVStreamError",
    "RequestCancelledError",
    "PrefillTimeoutError",
]
