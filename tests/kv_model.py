"""A small decoder-only transformer with a paged KV cache, for the KV-streaming tests.

Random weights from a fixed seed; float32 on the CPU with one thread, so every process computes
bit-identical results. The KV cache lives in one flat float32 tensor described by a
:class:`stolon.kvcache.KVCacheLayout` (tensors ``k`` and ``v``, one page =
``PAGE_TOKENS x HEADS x HEAD_DIM`` elements); a page table maps token positions to pages.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from stolon.kvcache import KVCacheLayout

LAYERS, HIDDEN, HEADS, VOCAB, PAGE_TOKENS, MAX_POS = 4, 64, 4, 100, 4, 256
HEAD_DIM = HIDDEN // HEADS
PAGE_ELEMS = PAGE_TOKENS * HEADS * HEAD_DIM


def make_layout(num_pages: int, order: str = "layer_major") -> KVCacheLayout:
    """The cache layout of this model for ``num_pages`` pages in ``order``."""
    return KVCacheLayout.build(
        LAYERS,
        num_pages,
        PAGE_ELEMS,
        tensors=("k", "v"),
        itemsize=4,
        order=order,
        tokens_per_page=PAGE_TOKENS,
    )


class PagedCache:
    """A flat float32 tensor holding ``layout``; pages viewed as ``[tokens, heads, dim]``."""

    def __init__(self, layout: KVCacheLayout) -> None:
        self.layout = layout
        self.buffer = torch.zeros(layout.total_elems, dtype=torch.float32)

    def page(self, layer: int, tensor: int, page: int) -> torch.Tensor:
        off = self.layout.elem_offset(layer, tensor, page)
        return self.buffer[off : off + PAGE_ELEMS].view(PAGE_TOKENS, HEADS, HEAD_DIM)

    def store(self, layer: int, tensor: int, pages: Sequence[int], pos0: int, x: torch.Tensor):
        """Writes ``x`` ([n, heads, dim]) at token positions ``pos0 ..`` of a page table."""
        for i in range(x.shape[0]):
            pos = pos0 + i
            self.page(layer, tensor, pages[pos // PAGE_TOKENS])[pos % PAGE_TOKENS] = x[i]

    def gather(self, layer: int, tensor: int, pages: Sequence[int], n: int) -> torch.Tensor:
        """Token positions ``0 .. n-1`` as ``[n, heads, dim]``."""
        need = -(-n // PAGE_TOKENS)
        return torch.cat([self.page(layer, tensor, p) for p in pages[:need]])[:n]


class TinyLM:
    """4 layers, hidden 64, 4 heads, vocab 100; pre-norm attention + MLP blocks."""

    def __init__(self, seed: int = 0) -> None:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(seed)

        def w(*shape: int, scale: float = 0.2) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * scale

        self.embed = w(VOCAB, HIDDEN, scale=1.0)
        self.pos = w(MAX_POS, HIDDEN, scale=0.5)
        self.layers = [
            {
                "qkv": w(HIDDEN, 3 * HIDDEN),
                "out": w(HIDDEN, HIDDEN),
                "up": w(HIDDEN, 4 * HIDDEN),
                "down": w(4 * HIDDEN, HIDDEN, scale=0.1),
            }
            for _ in range(LAYERS)
        ]
        self.head = w(HIDDEN, VOCAB)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (HIDDEN,))

    def _block(
        self,
        layer: int,
        x: torch.Tensor,
        cache: PagedCache,
        pages: Sequence[int],
        pos0: int,
    ) -> torch.Tensor:
        p = self.layers[layer]
        n = x.shape[0]
        q, k, v = (self._norm(x) @ p["qkv"]).split(HIDDEN, dim=-1)
        q = q.view(n, HEADS, HEAD_DIM)
        cache.store(layer, 0, pages, pos0, k.view(n, HEADS, HEAD_DIM))
        cache.store(layer, 1, pages, pos0, v.view(n, HEADS, HEAD_DIM))
        total = pos0 + n
        keys = cache.gather(layer, 0, pages, total)  # [total, heads, dim], from the pages
        vals = cache.gather(layer, 1, pages, total)
        scores = torch.einsum("qhd,khd->hqk", q, keys) / HEAD_DIM**0.5
        qpos = torch.arange(pos0, total).unsqueeze(1)
        kpos = torch.arange(total).unsqueeze(0)
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        att = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals).reshape(n, HIDDEN)
        x = x + att @ p["out"]
        return x + torch.relu(self._norm(x) @ p["up"]) @ p["down"]

    def _forward(
        self,
        tokens: Sequence[int],
        cache: PagedCache,
        pages: Sequence[int],
        pos0: int,
        hook: Optional[Callable[[int], None]] = None,
    ) -> Tuple[int, torch.Tensor]:
        ids = torch.tensor(list(tokens))
        x = self.embed[ids] + self.pos[pos0 : pos0 + len(tokens)]
        for layer in range(LAYERS):
            x = self._block(layer, x, cache, pages, pos0)
            if hook is not None:
                hook(layer)  # this layer's K/V pages are final: they may stream now
        last = self._norm(x[-1])
        return int(torch.argmax(last @ self.head)), last

    @torch.no_grad()
    def prefill(
        self,
        prompt: Sequence[int],
        cache: PagedCache,
        pages: Sequence[int],
        hook: Optional[Callable[[int], None]] = None,
    ) -> Tuple[int, torch.Tensor]:
        """Fills the cache for ``prompt``; returns the first generated token and last hidden."""
        return self._forward(prompt, cache, pages, 0, hook)

    @torch.no_grad()
    def decode(
        self, first: int, num_prompt: int, cache: PagedCache, pages: Sequence[int], steps: int
    ) -> List[int]:
        """Greedy decoding of ``steps`` tokens after ``first`` (which sits at ``num_prompt``)."""
        out, tok = [first], first
        for i in range(steps - 1):
            tok, _ = self._forward([tok], cache, pages, num_prompt + i)
            out.append(tok)
        return out

    def generate(self, prompt: Sequence[int], steps: int, num_pages: int = 64) -> List[int]:
        """The single-process reference: prefill and decode in one cache."""
        cache = PagedCache(make_layout(num_pages))
        pages = list(range(num_pages))[::-1]  # any page table gives the same tokens
        first, _ = self.prefill(prompt, cache, pages)
        return self.decode(first, len(prompt), cache, pages, steps)
