"""Layer-by-layer KV-cache streaming from prefill workers into a decode worker's paged cache.

Decode side (:class:`DecodeReceiver`): registers its paged cache and a tail area (one slot per
request in flight) once; per request it allocates pages, an immediate and a tail slot, and sends
the prefill worker a :class:`~.protocol.Pages` message. :meth:`DecodeReceiver.wait` returns once
exactly the expected number of immediates arrived (every page of every layer and the tail).

Prefill side (:class:`PrefillWorker`): registers its own paged cache and a tail area once, takes
:class:`~.protocol.Pages` grants (:meth:`PrefillWorker.next_request`) and for each one starts a
:class:`PrefillStream`: one prepared paged write per layer and tensor plus the tail write, all
armed behind a progress counter with ``engine.watch``. The model bumps the counter after each
layer's attention (:meth:`PrefillStream.layer_done`; on a GPU, ``HostCounter.write_from_stream``
with :meth:`PrefillStream.counter_value`), so the engine's worker writes that layer while the
next one computes; :meth:`PrefillStream.finish` fills the tail and releases it last.

Cancellation (either side) never lets a late write land in a reused page: the decode side keeps
a cancelled request's pages (and its immediate) quarantined until the prefill side said how many
immediates it posted for the request (it says so only after unwatching and waiting for all of
its writes) and that many have arrived. See ``docs/kvcache.md``.
"""

from __future__ import annotations

import dataclasses
import queue
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from .._native import Address, HostCounter, MemoryDescriptor, PreparedTransfer
from ..errors import (
    EngineStoppedError,
    KVStreamError,
    PrefillTimeoutError,
    RequestCancelledError,
    StolonError,
    TransferTimeoutError,
)
from . import protocol as proto
from .layout import KVCacheLayout, LayoutError

__all__ = [
    "TAIL_HEADER",
    "Tail",
    "KVStreamError",
    "RequestCancelledError",
    "PrefillTimeoutError",
    "PrefillWorker",
    "PrefillStream",
    "DecodeReceiver",
]

TAIL_HEADER = struct.Struct("<4sQIiI4x")
"""Tail slot header: magic ``b"KVT1"``, request id, token count, first token, payload length."""
_TAIL_MAGIC = b"KVT1"


@dataclass(frozen=True)
class Tail:
    """What the last write of a request carries besides the KV cache."""

    request_id: int
    num_tokens: int
    first_token: int
    payload: bytes


def _registered(engine: Any, obj: Any, need: int, what: str, staged: bool = False) -> Any:
    region = engine.register(obj, staged=True) if staged else engine.register(obj)
    if region.length < need:
        raise LayoutError(f"{what} holds {region.length} bytes, the layout needs {need}")
    return region


def _cuda_device(obj: Any) -> Optional[int]:
    """The CUDA device index of a torch tensor on a GPU, else None (torch is not imported)."""
    dev: Any = getattr(obj, "device", None)
    if getattr(dev, "type", None) == "cuda":
        return int(dev.index or 0)
    return None


# ------------------------------------------------------------------------------------------------
# prefill side
# ------------------------------------------------------------------------------------------------


class PrefillStream:
    """One request being streamed; created by :meth:`PrefillWorker.start`."""

    def __init__(
        self,
        worker: PrefillWorker,
        grant: proto.Pages,
        src_pages: Sequence[int],
        counter: HostCounter,
        slot: int,
    ) -> None:
        self.worker = worker
        self.grant = grant
        self.counter = counter
        self.slot = slot
        self._base = counter.value
        eng, layout = worker.engine, worker.layout
        dst_layout = worker.peer_layout(grant)
        cache_desc = MemoryDescriptor.from_bytes(grant.cache_desc)
        tail_desc = MemoryDescriptor.from_bytes(grant.tail_desc)
        self.tensors_per_layer = len(layout.tensors)
        steps: List[PreparedTransfer] = []
        for layer in range(layout.num_layers):
            for w in layout.layer_writes(layer, src_pages, dst_layout, grant.pages):
                steps.append(
                    eng.prepare_paged(
                        worker.region,
                        cache_desc,
                        w.page_bytes,
                        list(w.src_pages),
                        list(w.dst_pages),
                        src_stride=w.src_stride,
                        dst_stride=w.dst_stride,
                        src_offset=w.src_offset,
                        dst_offset=w.dst_offset,
                        imm=grant.imm,
                        timeout=worker.timeout,
                    )
                )
        steps.append(
            eng.prepare_write(
                worker.tail_region,
                slot * worker.tail_bytes,
                tail_desc,
                grant.tail_offset,
                grant.tail_bytes,
                imm=grant.imm,
                timeout=worker.timeout,
            )
        )
        self.imm_counts = [p.imm_count for p in steps]
        if sum(self.imm_counts) != grant.expected_imm:
            raise KVStreamError(
                f"request {grant.request_id}: these writes carry {sum(self.imm_counts)} "
                f"immediates, the decode side expects {grant.expected_imm}"
            )
        if self._base != 0:
            # watch() counts steps from 1; a reused counter is rebased by the caller's values.
            raise KVStreamError("start a stream with a counter at 0 (HostCounter())")
        self.watch_id, self.futures = eng.watch(counter, steps)
        self._lock = threading.Lock()
        self.state = "streaming"  # -> "finished" | "cancelled"
        self._final: Optional[Tuple[str, int]] = None

    @property
    def request_id(self) -> int:
        return self.grant.request_id

    @property
    def meta(self) -> bytes:
        return self.grant.meta

    def counter_value(self, layer: int) -> int:
        """The counter value that releases ``layer`` (for ``write_from_stream`` on a GPU)."""
        return (layer + 1) * self.tensors_per_layer

    @property
    def tail_counter_value(self) -> int:
        return self.worker.layout.num_layers * self.tensors_per_layer + 1

    def layer_done(self, layer: int) -> None:
        """The model's hook after ``layer``'s attention wrote its KV pages (CPU path)."""
        target = self.counter_value(layer)
        if self.counter.value < target:
            self.counter.set(target)

    def layer_done_on_stream(self, layer: int, stream: int = 0) -> None:
        """GPU path of :meth:`layer_done`: enqueues the counter write on CUDA ``stream`` (a raw
        ``CUstream``, e.g. ``torch.cuda.current_stream().cuda_stream``) after the kernels that
        wrote ``layer``'s pages; the engine's worker releases the layer when the GPU gets there.
        ``cuStreamWriteValue64`` needs no CPU launch and may be captured in a CUDA graph. The
        counter must be GPU-mapped (``HostCounter(device=N)``, the default for a CUDA cache)."""
        self.counter.write_from_stream(self.counter_value(layer), stream)

    def finish(self, first_token: int, num_tokens: int, payload: bytes = b"") -> None:
        """Fills the tail (first token, lengths, request id, payload) and releases its write.

        With a GPU model, call it once the stream that bumps the counter has passed the last
        layer (reading the first token with ``.item()`` synchronizes it): the tail is released
        from the host and the counter only moves forward."""
        n = TAIL_HEADER.size + len(payload)
        if n > self.grant.tail_bytes:
            raise KVStreamError(f"tail of {n} bytes exceeds the slot's {self.grant.tail_bytes}")
        base = self.slot * self.worker.tail_bytes
        buf = self.worker.tail_buffer
        hdr = TAIL_HEADER.pack(_TAIL_MAGIC, self.request_id, num_tokens, first_token, len(payload))
        buf[base : base + n] = np.frombuffer(hdr + payload, dtype=np.uint8)
        self.counter.set(self.tail_counter_value)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Waits for every write of the request, then tells the decode side "done"."""
        deadline = time.monotonic() + (self.worker.timeout if timeout is None else timeout)
        try:
            for f in self.futures:
                f.wait(max(deadline - time.monotonic(), 0.0))
        except EngineStoppedError:
            if self.state == "cancelled":
                raise RequestCancelledError(f"request {self.request_id} was cancelled") from None
            raise
        total = sum(self.imm_counts)
        try:  # every step was released: the worker need not poll this counter any more
            self.worker.engine.unwatch(self.watch_id)
        except StolonError:
            pass
        with self._lock:
            if self.state != "streaming":
                raise RequestCancelledError(f"request {self.request_id} was cancelled")
            self.state = "finished"
            self._final = ("finished", total)
        msg = proto.Done(self.worker.engine_id, self.request_id, self.grant.tail_bytes, total)
        self.worker._send(self.grant, msg)
        self.worker._retire(self, total)

    def _stop(self) -> int:
        """Unwatches and waits for every write; returns the immediates posted (or UNKNOWN)."""
        try:
            self.worker.engine.unwatch(self.watch_id)
        except StolonError:
            pass
        sent = 0
        for f, n in zip(self.futures, self.imm_counts):
            try:
                f.wait(self.worker.timeout)
                sent += n
            except EngineStoppedError:
                pass  # never posted
            except StolonError:
                return proto.UNKNOWN  # posted, outcome unknown
        return sent

    def cancel(self, reason: str = "") -> int:
        """Abandons the request from the prefill side; the decode side frees its pages once every
        write posted so far has landed. Returns the immediates posted."""
        return self.worker._cancel_stream(self, reason, ack=True)


class PrefillWorker:
    """A prefill worker's side: its paged cache and tail area, registered once.

    ``cache`` (numpy array or torch tensor, CPU or CUDA) holds ``layout``; grants arrive as
    :class:`~.protocol.Pages` messages from any decode worker (:meth:`next_request`), each
    naming the decode cache's geometry. The worker owns the engine's message callback.
    """

    def __init__(
        self,
        engine: Any,
        layout: KVCacheLayout,
        cache: Any,
        *,
        tail_bytes: int = 4096,
        max_requests: int = 8,
        timeout: float = 30.0,
    ) -> None:
        self.engine = engine
        self.layout = layout
        self.timeout = timeout
        self.tail_bytes = tail_bytes
        self.engine_id = engine.address.engine_id
        self.region = _registered(engine, cache, layout.total_bytes, "the prefill cache")
        self.device = _cuda_device(cache)
        self.tail_buffer = np.zeros(max_requests * tail_bytes, dtype=np.uint8)
        self.tail_region = engine.register(self.tail_buffer)
        self._free_slots = list(range(max_requests))
        self._lock = threading.RLock()
        self._grants: queue.Queue = queue.Queue()
        self._streams: Dict[Tuple[int, int], PrefillStream] = {}
        self._finished: Dict[Tuple[int, int], int] = {}
        # Cancelled before their stream started: key -> whether the ack went out.
        self._tombstones: Dict[Tuple[int, int], bool] = {}
        self._addresses: Dict[int, Address] = {}
        self.errors: List[str] = []
        engine.on_message(self._on_message)

    @property
    def descriptor(self) -> MemoryDescriptor:
        """This worker's cache descriptor: give it (or its bytes) to decode workers, whose
        :meth:`DecodeReceiver.start_request` derives the exact immediate count from the path
        (fabric, staged or NVLink) between the two caches."""
        return self.region.descriptor

    def peer_layout(self, grant: proto.Pages) -> KVCacheLayout:
        """The decode side's layout, from the grant's geometry (checked against the shape key)."""
        num_pages, ls, ts, ps, off = grant.geometry
        peer = dataclasses.replace(
            self.layout,
            num_pages=num_pages,
            layer_stride=ls,
            tensor_stride=ts,
            page_stride=ps,
            offset=off,
            order="custom",
        )
        if grant.shape_key != self.layout.shape_key():
            raise KVStreamError(
                f"decode engine {grant.sender:#x}'s cache does not match this worker's layout "
                "(layers, tensors, page shape or dtype differ)"
            )
        return peer

    # -- messages --

    def _send_to(self, peer: Address, msg: proto.Message) -> None:
        try:
            self.engine.send(peer, proto.encode(msg)).wait(self.timeout)
        except StolonError as e:  # the decode side is gone; nothing else to tell it
            self.errors.append(f"send to {msg.sender:#x} failed: {e}")

    def _send(self, grant: proto.Pages, msg: proto.Message) -> None:
        self._send_to(MemoryDescriptor.from_bytes(grant.cache_desc).address, msg)

    def _on_message(self, data: bytes) -> None:
        try:
            msg = proto.decode(data)
        except proto.ProtocolError as e:
            self.errors.append(f"bad message: {e}")
            return
        if isinstance(msg, proto.Pages):
            key = (msg.sender, msg.request_id)
            addr = MemoryDescriptor.from_bytes(msg.cache_desc).address
            with self._lock:
                self._addresses[msg.sender] = addr
                owe_ack = self._tombstones.get(key) is False
                if owe_ack:
                    self._tombstones[key] = True
            if owe_ack:  # its cancel came first: nothing was or will be written
                ack = proto.Cancel(self.engine_id, msg.request_id, True, 0, "cancelled")
                threading.Thread(target=self._send_to, args=(addr, ack), daemon=True).start()
            else:
                self._grants.put(msg)
        elif isinstance(msg, proto.Cancel) and not msg.ack:
            # Off the callback thread: stopping a stream waits for its writes.
            threading.Thread(target=self._on_cancel, args=(msg,), daemon=True).start()
        else:
            self.errors.append(f"unexpected message {type(msg).__name__}")

    def _on_cancel(self, msg: proto.Cancel) -> None:
        key = (msg.sender, msg.request_id)
        with self._lock:
            stream = self._streams.get(key)
            done = self._finished.get(key)
            peer = self._addresses.get(msg.sender)
            if stream is None and done is None:
                # Not started (or its grant not even here yet): it never will be.
                self._tombstones[key] = peer is not None
        if stream is not None:
            self._cancel_stream(stream, msg.reason, ack=True)
            return
        if peer is not None:
            sent = done if done is not None else 0
            self._send_to(peer, proto.Cancel(self.engine_id, msg.request_id, True, sent, ""))

    def _cancel_stream(self, stream: PrefillStream, reason: str, ack: bool) -> int:
        with stream._lock:
            if stream._final is not None:
                sent = stream._final[1]
            else:
                stream.state = "cancelled"
                sent = stream._stop()
                stream._final = ("cancelled", sent)
        msg = proto.Cancel(self.engine_id, stream.request_id, ack, sent, reason)
        self._send(stream.grant, msg)
        self._retire(stream, sent)
        return sent

    def _retire(self, stream: PrefillStream, sent: int) -> None:
        key = (stream.grant.sender, stream.request_id)
        with self._lock:
            if self._streams.pop(key, None) is not None:
                self._free_slots.append(stream.slot)
            self._finished[key] = sent
            if len(self._finished) > 4096:  # bounded memory of old requests
                self._finished.pop(next(iter(self._finished)))

    # -- requests --

    def next_request(self, timeout: Optional[float] = None) -> proto.Pages:
        """The next grant from a decode worker (skipping ones already cancelled)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                grant = self._grants.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise TransferTimeoutError(f"no request arrived within {timeout}s") from None
            with self._lock:
                if (grant.sender, grant.request_id) not in self._tombstones:
                    return grant

    def start(
        self,
        grant: proto.Pages,
        src_pages: Sequence[int],
        counter: Optional[HostCounter] = None,
    ) -> PrefillStream:
        """Arms the writes of one request; the model then calls ``layer_done`` / ``finish``.

        ``src_pages``: this side's pages holding the request's KV cache, in token order (as
        many as ``grant.pages``). ``counter``: a fresh :class:`HostCounter` at 0 (GPU-mapped
        for a GPU model); one is made when omitted, GPU-mapped on the cache's device when the
        cache is a CUDA tensor.
        """
        if grant.tail_bytes > self.tail_bytes:
            raise KVStreamError(f"tail slot {grant.tail_bytes} > this side's {self.tail_bytes}")
        key = (grant.sender, grant.request_id)
        with self._lock:  # a cancel waits until the stream exists (or never starts it)
            if key in self._tombstones:
                raise RequestCancelledError(f"request {grant.request_id} was cancelled")
            if key in self._streams or key in self._finished:
                raise KVStreamError(f"request {grant.request_id} was already started")
            if not self._free_slots:
                raise KVStreamError("every tail slot is in use (max_requests)")
            slot = self._free_slots.pop()
            try:
                if counter is None:
                    counter = HostCounter(device=self.device)
                stream = PrefillStream(self, grant, src_pages, counter, slot)
            except BaseException:
                self._free_slots.append(slot)
                raise
            self._streams[key] = stream
        return stream


# ------------------------------------------------------------------------------------------------
# decode side
# ------------------------------------------------------------------------------------------------


@dataclass
class _Request:
    request_id: int
    peer: Address
    pages: List[int]
    prompt_pages: int
    slot: int
    imm: int
    expected: int
    state: str = "streaming"  # -> "landed" | "cancelling" | "cancelled"
    done: Optional[proto.Done] = None
    reason: str = ""


class DecodeReceiver:
    """A decode worker's side: the paged cache and the tail area, registered once.

    ``cache`` holds ``layout`` (numpy array or torch tensor, CPU or CUDA); pages are handed out
    per request and returned by :meth:`release` (or, for cancelled requests, once the prefill
    side's writes are accounted for). The receiver owns the engine's message callback.

    How many immediates a request brings depends on the path between the two caches (a staged
    GPU destination gets one per ``max_message_bytes`` chunk of each page, NVLink one per page):
    pass the prefill worker's cache descriptor (:attr:`PrefillWorker.descriptor`) to
    :meth:`start_request` so the count is exact for any pair. ``staged_host=True`` registers a
    host cache through the staging protocol, as a GPU cache would be (a test hook).
    """

    def __init__(
        self,
        engine: Any,
        layout: KVCacheLayout,
        cache: Any,
        *,
        tail_bytes: int = 4096,
        max_requests: int = 16,
        imm_base: int = 0x4B560000,
        timeout: float = 30.0,
        quarantine_timeout: float = 600.0,
        staged_host: bool = False,
    ) -> None:
        if tail_bytes < TAIL_HEADER.size:
            raise ValueError(f"tail_bytes must be >= {TAIL_HEADER.size}")
        self.engine = engine
        self.layout = layout
        self.tail_bytes = tail_bytes
        self.timeout = timeout
        self.quarantine_timeout = quarantine_timeout
        self.engine_id = engine.address.engine_id
        self.region = _registered(
            engine, cache, layout.total_bytes, "the decode cache", staged=staged_host
        )
        self.tail_buffer = np.zeros(max_requests * tail_bytes, dtype=np.uint8)
        self.tail_region = engine.register(self.tail_buffer)
        self._imm_base = imm_base
        self._imm_span = 1 << 16
        self._next_seq = 0
        self._next_rid = 1
        self._lock = threading.Lock()
        self._free_pages: List[int] = list(range(layout.num_pages))
        self._free_slots: List[int] = list(range(max_requests))
        self._quarantine: Dict[int, _Request] = {}
        self._requests: Dict[int, _Request] = {}
        self._imms_in_use: Set[int] = set()
        self.errors: List[str] = []
        engine.on_message(self._on_message)

    # -- accounting --

    @property
    def free_pages(self) -> List[int]:
        with self._lock:
            return sorted(self._free_pages)

    @property
    def quarantined_pages(self) -> List[int]:
        with self._lock:
            return sorted(p for r in self._quarantine.values() for p in r.pages)

    def expected_imm(self, prompt_pages: int, prefill: Optional[MemoryDescriptor] = None) -> int:
        """Immediates one request of ``prompt_pages`` pages brings (every layer, tensor, tail).

        ``prefill`` is the prefill worker's cache descriptor: the count then follows the path
        its writes take into this cache (``imm_count_for`` from this side's view of the same
        pair of regions: fabric, staged or NVLink). Without it the prefill cache is taken to be
        host memory (or on another host): fabric into a host cache, staged into a GPU one.
        """
        pb = self.layout.page_bytes
        if self.region.memory == "staged_host":  # the test hook: staged whatever the source
            per_page = self.engine.imm_count_paged(1, pb, staged=True)
        else:
            # One paged write is one op per page (more when a page exceeds the path's op size):
            # a single write of one page pinned to one domain has exactly that many.
            peer = self.region.descriptor if prefill is None else prefill
            per_page = self.engine.imm_count_for(self.region, peer, pb, pin_domain=0)
        paged = self.layout.num_layers * len(self.layout.tensors) * prompt_pages * per_page
        return paged + self.engine.imm_count_write(self.tail_bytes)

    def _take_imm(self) -> int:
        for _ in range(self._imm_span):
            imm = self._imm_base + self._next_seq
            self._next_seq = (self._next_seq + 1) % self._imm_span
            if imm not in self._imms_in_use:
                self._imms_in_use.add(imm)
                return imm
        raise KVStreamError("every immediate of this receiver is in use")

    # -- requests --

    def start_request(
        self,
        prefill: Union[Address, MemoryDescriptor],
        num_tokens: int,
        *,
        reserve_tokens: int = 0,
        meta: bytes = b"",
        pages: Optional[Sequence[int]] = None,
    ) -> int:
        """Allocates pages for ``num_tokens`` (+ ``reserve_tokens`` for decoding) and sends the
        grant to ``prefill``; returns the request id.

        ``prefill`` is the prefill worker's address, or better its cache descriptor
        (:attr:`PrefillWorker.descriptor`), which makes the expected immediate count exact for
        GPU caches (see :meth:`expected_imm`).

        ``pages`` picks the (free) pages instead, in token order, for engines that keep their
        own block tables."""
        prefill_desc: Optional[MemoryDescriptor] = None
        if isinstance(prefill, MemoryDescriptor):
            prefill_desc, prefill = prefill, prefill.address
        tpp = self.layout.tokens_per_page
        prompt_pages = -(-num_tokens // tpp)
        total = -(-(num_tokens + reserve_tokens) // tpp)
        if prompt_pages < 1:
            raise ValueError("a request needs at least one token")
        with self._lock:
            if len(self._free_pages) < total:
                raise KVStreamError(
                    f"{total} pages needed, {len(self._free_pages)} free "
                    f"({sum(len(r.pages) for r in self._quarantine.values())} quarantined)"
                )
            if not self._free_slots:
                raise KVStreamError("every tail slot is in use (max_requests)")
            if pages is None:
                chosen = [self._free_pages.pop(0) for _ in range(total)]
            else:
                chosen = list(pages)
                self.layout.check_pages(chosen)
                if len(chosen) != total or not set(chosen) <= set(self._free_pages):
                    raise KVStreamError(f"pages must be {total} free pages: {chosen}")
                self._free_pages = [p for p in self._free_pages if p not in set(chosen)]
            slot = self._free_slots.pop(0)
            imm = self._take_imm()
            rid = self._next_rid
            self._next_rid += 1
            req = _Request(rid, prefill, chosen, prompt_pages, slot, imm, 0)
            req.expected = self.expected_imm(prompt_pages, prefill_desc)
            self._requests[rid] = req
        off = slot * self.tail_bytes
        self.tail_buffer[off : off + self.tail_bytes] = 0
        grant = proto.Pages(
            sender=self.engine_id,
            request_id=rid,
            imm=imm,
            expected_imm=req.expected,
            tail_offset=off,
            tail_bytes=self.tail_bytes,
            shape_key=self.layout.shape_key(),
            geometry=(
                self.layout.num_pages,
                self.layout.layer_stride,
                self.layout.tensor_stride,
                self.layout.page_stride,
                self.layout.offset,
            ),
            pages=tuple(chosen[:prompt_pages]),
            cache_desc=self.region.descriptor.to_bytes(),
            tail_desc=self.tail_region.descriptor.to_bytes(),
            meta=meta,
        )
        try:
            self.engine.send(prefill, proto.encode(grant)).wait(self.timeout)
        except StolonError:
            self._drop(req, free=True)
            raise
        return rid

    def pages(self, request_id: int) -> List[int]:
        """The request's pages in token order (the prompt's, then the reserved ones)."""
        return list(self._get(request_id).pages)

    def _get(self, rid: int) -> _Request:
        with self._lock:
            req = self._requests.get(rid)
        if req is None:
            raise KVStreamError(f"no request {rid}")
        return req

    def wait(self, request_id: int, timeout: Optional[float] = None) -> Tail:
        """Waits until every page of every layer and the tail of the request have landed.

        Raises :class:`PrefillTimeoutError` (a ``TransferTimeoutError``) when they do not
        within ``timeout``, and :class:`RequestCancelledError` when the request was cancelled.
        """
        req = self._get(request_id)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if req.state in ("cancelling", "cancelled"):
                    raise RequestCancelledError(
                        f"request {request_id} was cancelled: {req.reason or 'no reason'}"
                    )
                if req.state == "landed":
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                got = self.engine.imm_count(req.imm)
                raise PrefillTimeoutError(
                    f"request {request_id}: {got} of {req.expected} immediates arrived within "
                    f"{timeout}s; the prefill worker ({req.peer.to_text()[:40]}...) is slow or "
                    "dead; cancel() the request to quarantine its pages"
                )
            try:
                self.engine.wait_imm(req.imm, req.expected, min(left, 0.05))
            except TransferTimeoutError:
                continue
            with self._lock:
                if req.state == "streaming":
                    req.state = "landed"
                else:  # cancelled meanwhile: the counts are consumed, the pages are safe
                    req.expected = 0
        return self._read_tail(req)

    def _read_tail(self, req: _Request) -> Tail:
        off = req.slot * self.tail_bytes
        raw = self.tail_buffer[off : off + self.tail_bytes].tobytes()
        magic, rid, ntok, first, plen = TAIL_HEADER.unpack_from(raw)
        if magic != _TAIL_MAGIC or rid != req.request_id:
            raise KVStreamError(f"request {req.request_id}: the tail slot holds {magic!r}/{rid}")
        payload = raw[TAIL_HEADER.size : TAIL_HEADER.size + plen]
        return Tail(rid, ntok, first, payload)

    def release(self, request_id: int) -> None:
        """Returns a landed (or finished) request's pages; cancel unfinished ones instead."""
        req = self._get(request_id)
        with self._lock:
            if req.state != "landed":
                raise KVStreamError(
                    f"request {request_id} is {req.state}; cancel() it instead of release()"
                )
        self._drop(req, free=True)

    def cancel(self, request_id: int, reason: str = "") -> None:
        """Abandons a request. Its pages are quarantined until the prefill side acknowledges and
        every write it posted has landed (forever, if it never answers)."""
        req = self._get(request_id)
        with self._lock:
            if req.state == "landed":
                landed = True
            elif req.state in ("cancelling", "cancelled"):
                return
            else:
                landed = False
                req.state, req.reason = "cancelling", reason or "cancelled by decode"
                del self._requests[request_id]
                self._quarantine[request_id] = req
        if landed:
            self._drop(req, free=True)
            return
        msg = proto.Cancel(self.engine_id, request_id, False, proto.UNKNOWN, reason)

        def sent(err: Optional[BaseException]) -> None:
            if err is not None:  # a dead prefill: the pages stay quarantined
                self.errors.append(f"cancel of {request_id} not delivered: {err}")

        # Not waited for: a dead prefill side must not hold the caller up.
        self.engine.send(req.peer, proto.encode(msg), timeout=self.timeout).add_done_callback(sent)

    def _drop(self, req: _Request, free: bool) -> None:
        with self._lock:
            self._requests.pop(req.request_id, None)
            self._quarantine.pop(req.request_id, None)
            if free:
                self._free_pages.extend(req.pages)
                self._free_slots.append(req.slot)
                self._imms_in_use.discard(req.imm)

    # -- messages --

    def _on_message(self, data: bytes) -> None:
        try:
            msg = proto.decode(data)
        except proto.ProtocolError as e:
            self.errors.append(f"bad message: {e}")
            return
        if isinstance(msg, proto.Done):
            with self._lock:
                req = self._requests.get(msg.request_id)
                if req is not None:
                    req.done = msg
        elif isinstance(msg, proto.Cancel) and msg.ack:
            self._on_ack(msg)
        else:
            self.errors.append(f"unexpected message {type(msg).__name__}")

    def _on_ack(self, msg: proto.Cancel) -> None:
        with self._lock:
            req = self._requests.pop(msg.request_id, None) or self._quarantine.get(msg.request_id)
            if req is None or req.state == "cancelled":
                return
            if req.state == "landed":  # finished before the cancel: nothing in flight
                self._requests[msg.request_id] = req
                return
            req.state = "cancelled"
            req.reason = req.reason or msg.reason or "cancelled by prefill"
            self._quarantine[req.request_id] = req
            # wait() may have consumed a full count meanwhile (req.expected is then 0).
            owed = msg.imm_sent if req.expected else 0
        if msg.imm_sent == proto.UNKNOWN:
            self.errors.append(f"request {msg.request_id}: prefill cannot account; pages kept")
            return
        if owed == 0:
            self._drop(req, free=True)
            return

        def landed(err: Optional[BaseException]) -> None:
            if err is None:
                self._drop(req, free=True)
            else:
                self.errors.append(f"request {req.request_id}: late writes never came: {err}")

        self.engine.expect_imm(req.imm, owed, landed, self.quarantine_timeout)
