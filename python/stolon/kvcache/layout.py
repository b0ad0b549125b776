"""Paged KV-cache layouts: where page ``p`` of tensor ``t`` of layer ``l`` lives, in bytes.

A paged KV cache is ``layers x tensors x pages x page_elems`` elements of one dtype, held in one
registered buffer. ``tensors`` is ``("k", "v")`` for standard attention, ``("latent",)`` for an
MLA-style single latent cache, or any other list of per-layer tensors (e.g. K, V and their
quantization scales when those share a page shape). Each page of one (layer, tensor) is
``page_elems`` contiguous elements; where pages, tensors and layers sit relative to each other is
given by three element strides, so the common orders are presets:

- ``layer_major``: ``[layer][tensor][page][page_elems]`` (vLLM-style per-layer K/V blocks);
- ``page_major``: ``[page][layer][tensor][page_elems]`` (one page holds every layer's K/V for
  its tokens);

and :meth:`KVCacheLayout.from_strides` accepts any non-overlapping arrangement.

For one layer and a page table, :meth:`KVCacheLayout.layer_writes` gives what
``TransferEngine.write_paged`` needs: one paged write per tensor, whose pages are strided in
memory (``src_offset + src_pages[i] * src_stride`` on the source side, likewise on the
destination side). Two sides may use different orders as long as they are
:meth:`compatible <KVCacheLayout.compatible>` (same layers, tensors, page shape and dtype size).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from ..errors import LayoutError

__all__ = ["KVCacheLayout", "LayoutError", "PagedWrite", "LAYER_MAJOR", "PAGE_MAJOR"]

LAYER_MAJOR = "layer_major"
PAGE_MAJOR = "page_major"


@dataclass(frozen=True)
class PagedWrite:
    """One ``write_paged`` call: one tensor of one layer, a list of pages on both sides.

    Offsets and strides are in bytes; page ``i`` goes from
    ``src_offset + src_pages[i] * src_stride`` to ``dst_offset + dst_pages[i] * dst_stride``,
    ``page_bytes`` long.
    """

    layer: int
    tensor: str
    page_bytes: int
    src_pages: Tuple[int, ...]
    dst_pages: Tuple[int, ...]
    src_offset: int
    src_stride: int
    dst_offset: int
    dst_stride: int


@dataclass(frozen=True)
class KVCacheLayout:
    """A paged KV cache in one buffer, described with element strides.

    ``layer_stride``, ``tensor_stride`` and ``page_stride`` are in elements (of ``itemsize``
    bytes); element ``e`` of page ``p`` of tensor ``t`` of layer ``l`` sits at element
    ``offset + l * layer_stride + t * tensor_stride + p * page_stride + e``.
    ``tokens_per_page`` is informational (a page holds that many tokens' worth of
    ``page_elems``).
    """

    num_layers: int
    num_pages: int
    tensors: Tuple[str, ...]
    page_elems: int
    itemsize: int
    layer_stride: int
    tensor_stride: int
    page_stride: int
    offset: int = 0
    tokens_per_page: int = 1
    order: str = "custom"

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_pages < 1 or self.page_elems < 1:
            raise LayoutError("layers, pages and page_elems must be >= 1")
        if self.itemsize < 1 or self.tokens_per_page < 1 or self.offset < 0:
            raise LayoutError("itemsize and tokens_per_page must be >= 1, offset >= 0")
        if not self.tensors or len(set(self.tensors)) != len(self.tensors):
            raise LayoutError(f"tensor names must be distinct and non-empty: {self.tensors}")
        if min(self.layer_stride, self.tensor_stride, self.page_stride) < 0:
            raise LayoutError("strides must be >= 0")
        self._check_disjoint()

    def _check_disjoint(self) -> None:
        """Every (layer, tensor, page) must own its own ``page_elems`` elements."""
        dims = [
            (self.num_layers, self.layer_stride),
            (len(self.tensors), self.tensor_stride),
            (self.num_pages, self.page_stride),
        ]
        # Sort the used dimensions by stride: each stride must cover the extent of the smaller
        # ones (the usual test for a non-overlapping strided view).
        extent = self.page_elems
        for n, stride in sorted((d for d in dims if d[0] > 1), key=lambda d: d[1]):
            if stride < extent:
                raise LayoutError(
                    f"strides overlap: stride {stride} < extent {extent} of the inner dimensions"
                )
            extent = stride * (n - 1) + extent

    # -- constructors --

    @classmethod
    def build(
        cls,
        num_layers: int,
        num_pages: int,
        page_elems: int,
        *,
        tensors: Sequence[str] = ("k", "v"),
        itemsize: int = 2,
        order: str = LAYER_MAJOR,
        tokens_per_page: int = 1,
        page_padding: int = 0,
    ) -> KVCacheLayout:
        """A dense layout in ``order`` (``layer_major`` or ``page_major``).

        ``page_padding`` adds that many unused elements after each page (pages strided
        further apart than their size, as with aligned page slots).
        """
        nt = len(tensors)
        ps = page_elems + page_padding
        if order == LAYER_MAJOR:
            strides = (nt * num_pages * ps, num_pages * ps, ps)
        elif order == PAGE_MAJOR:
            strides = (nt * ps, ps, num_layers * nt * ps)
        else:
            raise LayoutError(f"order must be {LAYER_MAJOR!r} or {PAGE_MAJOR!r}, not {order!r}")
        return cls(
            num_layers,
            num_pages,
            tuple(tensors),
            page_elems,
            itemsize,
            *strides,
            tokens_per_page=tokens_per_page,
            order=order,
        )

    @classmethod
    def mla(
        cls,
        num_layers: int,
        num_pages: int,
        tokens_per_page: int,
        latent_dim: int,
        *,
        itemsize: int = 2,
        order: str = LAYER_MAJOR,
    ) -> KVCacheLayout:
        """An MLA-style cache: one latent (``kv_lora + rope`` dims) per token and layer."""
        return cls.build(
            num_layers,
            num_pages,
            tokens_per_page * latent_dim,
            tensors=("latent",),
            itemsize=itemsize,
            order=order,
            tokens_per_page=tokens_per_page,
        )

    @classmethod
    def from_strides(
        cls,
        num_layers: int,
        num_pages: int,
        page_elems: int,
        strides: Tuple[int, int, int],
        *,
        tensors: Sequence[str] = ("k", "v"),
        itemsize: int = 2,
        offset: int = 0,
        tokens_per_page: int = 1,
    ) -> KVCacheLayout:
        """Any arrangement: ``strides`` = (layer, tensor, page) strides in elements."""
        return cls(
            num_layers,
            num_pages,
            tuple(tensors),
            page_elems,
            itemsize,
            *strides,
            offset=offset,
            tokens_per_page=tokens_per_page,
        )

    # -- geometry --

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one tensor of one layer."""
        return self.page_elems * self.itemsize

    @property
    def total_elems(self) -> int:
        """Elements the buffer must hold (one past the last element any page uses)."""
        last = (
            self.offset
            + (self.num_layers - 1) * self.layer_stride
            + (len(self.tensors) - 1) * self.tensor_stride
            + (self.num_pages - 1) * self.page_stride
        )
        return last + self.page_elems

    @property
    def total_bytes(self) -> int:
        return self.total_elems * self.itemsize

    def tensor_index(self, tensor: str) -> int:
        try:
            return self.tensors.index(tensor)
        except ValueError:
            raise LayoutError(f"no tensor {tensor!r} in {self.tensors}") from None

    def elem_offset(self, layer: int, tensor: int, page: int) -> int:
        """Element offset of the first element of a page."""
        if not (0 <= layer < self.num_layers and 0 <= tensor < len(self.tensors)):
            raise LayoutError(f"layer {layer} / tensor {tensor} out of range")
        if not 0 <= page < self.num_pages:
            raise LayoutError(f"page {page} out of range (0..{self.num_pages - 1})")
        return (
            self.offset
            + layer * self.layer_stride
            + tensor * self.tensor_stride
            + page * self.page_stride
        )

    def byte_offset(self, layer: int, tensor: int, page: int) -> int:
        return self.elem_offset(layer, tensor, page) * self.itemsize

    def compatible(self, other: KVCacheLayout) -> bool:
        """Whether pages can move between the two (any order, any page count)."""
        return (
            self.num_layers == other.num_layers
            and self.tensors == other.tensors
            and self.page_elems == other.page_elems
            and self.itemsize == other.itemsize
            and self.tokens_per_page == other.tokens_per_page
        )

    def shape_key(self) -> bytes:
        """8 bytes identifying what :meth:`compatible` compares (sent in the protocol)."""
        text = f"{self.num_layers}|{','.join(self.tensors)}|{self.page_elems}|{self.itemsize}|"
        text += str(self.tokens_per_page)
        return hashlib.blake2b(text.encode(), digest_size=8).digest()

    def check_pages(self, pages: Sequence[int]) -> None:
        """Raises :class:`LayoutError` unless ``pages`` are distinct indices of this cache."""
        if len(set(pages)) != len(pages):
            raise LayoutError("a page table names a page twice")
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise LayoutError(f"page {p} out of range (0..{self.num_pages - 1})")

    def layer_writes(
        self, layer: int, src_pages: Sequence[int], dst: KVCacheLayout, dst_pages: Sequence[int]
    ) -> List[PagedWrite]:
        """The paged writes (one per tensor) that move ``layer``'s pages from here to ``dst``."""
        if not self.compatible(dst):
            raise LayoutError(f"layouts are not compatible: {self} vs {dst}")
        if len(src_pages) != len(dst_pages):
            raise LayoutError(f"{len(src_pages)} source pages but {len(dst_pages)} destination")
        self.check_pages(src_pages)
        dst.check_pages(dst_pages)
        out = []
        for t, name in enumerate(self.tensors):
            out.append(
                PagedWrite(
                    layer=layer,
                    tensor=name,
                    page_bytes=self.page_bytes,
                    src_pages=tuple(src_pages),
                    dst_pages=tuple(dst_pages),
                    src_offset=self.byte_offset(layer, t, 0),
                    src_stride=self.page_stride * self.itemsize,
                    dst_offset=dst.byte_offset(layer, t, 0),
                    dst_stride=dst.page_stride * dst.itemsize,
                )
            )
        return out

    def page_ranges(self, pages: Sequence[int]) -> List[Tuple[int, int]]:
        """Byte ranges ``(start, stop)`` of ``pages`` in every layer and tensor (for checks)."""
        return [
            (self.byte_offset(lay, t, p), self.byte_offset(lay, t, p) + self.page_bytes)
            for lay, t, p in itertools.product(
                range(self.num_layers), range(len(self.tensors)), pages
            )
        ]
