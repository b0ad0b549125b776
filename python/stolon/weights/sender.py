"""The training rank's role: :class:`WeightSender` (see :mod:`.execute` for the protocol)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import WeightTransferError
from .program import _Program, _Request
from .tables import WeightPlan
from .wire import IMM_AMAX, IMM_DATA, IMM_RELEASE, _b64, _dumps, _loads, _unb64, imm_for

__all__ = ["WeightSender"]


class WeightSender:
    """A training rank: pushes its share of every update (see :mod:`.execute`).

    ``buffers`` maps the names of :meth:`TrainingLayout.buffers` to this rank's arrays (views
    of the live parameters; their contents are read during :meth:`push`). ``host_copy=True``
    gathers even unconverted parameters through the staging ring (the path a rank that keeps
    parameters in unregistered or offloaded memory takes).

    ``device`` ("cuda:N", or "cpu" for torch CPU tensors) takes torch tensors as ``buffers``:
    staging ring, scales and stamps then live on that device, gather, tile maxima and fp8
    conversion run as torch ops there (bit-identical to the numpy path), and buffers kept on
    another device (CPU-offloaded shards) are copied host-to-device in the pipeline.
    """

    def __init__(
        self,
        engine: Any,
        plan: WeightPlan,
        rank: int,
        buffers: Mapping[str, np.ndarray],
        *,
        staging_bytes: int = 4 << 20,
        depth: int = 4,
        host_copy: bool = False,
        timeout: float = 60.0,
        device: Optional[str] = None,
    ) -> None:
        self.engine = engine
        self.plan = plan
        self.rank = rank
        self.timeout = timeout
        self.prog: _Program
        if device is None:
            self.prog = _Program(
                plan, rank, buffers, staging_bytes=staging_bytes, depth=depth, host_copy=host_copy
            )
        else:
            from .gpu import TorchProgram

            self.prog = TorchProgram(
                plan, rank, buffers, staging_bytes=staging_bytes, depth=depth,
                host_copy=host_copy, device=device,
            )  # fmt: skip
        pr = self.prog
        self._regions: Dict[Tuple[Any, ...], Any] = {}
        keys: List[Tuple[Any, ...]] = [("staging",), ("scales",), ("stamp",)]
        keys += [("buf", i) for i in range(len(pr.arrays))]
        for k in keys:
            used = any(r[1] == k for b in pr.batches for r in b.requests) or k[0] != "buf"
            if used:
                self._regions[k] = engine.register(pr.source(k))
        self.inbox_region = engine.register(pr.inbox)
        self.outbox_region = engine.register(pr.outbox)
        self._dst: Dict[int, Tuple[Any, int]] = {}  # inference rank -> (descriptor, slot bytes)
        self._peer: Dict[int, Tuple[Any, int, int]] = {}  # training peer -> (desc, total, off)
        self._counts: Dict[int, int] = {}
        self._amax_expected: Optional[int] = None
        self._pushed: set = set()
        self._slots: Optional[int] = None  # slots of every receiver (they must agree)

    def info(self) -> bytes:
        """Bytes for peers: address, amax inbox and where each peer writes in it."""
        return _dumps(
            {
                "kind": "train",
                "rank": self.rank,
                "fingerprint": self.plan.fingerprint(),
                "address": _b64(self.engine.address.to_bytes()),
                "inbox": _b64(self.inbox_region.descriptor.to_bytes()),
                "inbox_total": self.prog.inbox_total,
                "inbox_off": {str(q): o for q, o in self.prog.inbox_off.items()},
            }
        )

    def connect(self, infos: Sequence[bytes]) -> Dict[Tuple[str, int], bytes]:
        """Takes the infos of (at least) this rank's receivers and tile-sharing peers; returns
        hellos keyed ``("infer", rank)`` / ``("train", rank)`` for those ranks to accept."""
        from ..engine import MemoryDescriptor

        pr = self.prog
        for b in infos:
            m = _loads(b)
            if m.get("fingerprint") != self.plan.fingerprint():
                raise WeightTransferError(f"{m.get('kind')} rank {m.get('rank')}: plan differs")
            r = int(m["rank"])
            if m["kind"] == "infer" and r in pr.layouts:
                if m["slot_bytes"] != pr.layouts[r].slot_bytes:
                    raise WeightTransferError(f"inference rank {r}: slot size differs")
                self._dst[r] = (MemoryDescriptor.from_bytes(_unb64(m["slots"])), m["slot_bytes"])
                k = int(m.get("num_slots", 2))
                if self._slots is not None and k != self._slots:
                    raise WeightTransferError(
                        f"inference rank {r} has {k} slots, another receiver {self._slots}: "
                        "every receiver of a plan must use the same number"
                    )
                self._slots = k
            elif m["kind"] == "train" and r in pr.peer_tiles:
                off = m["inbox_off"].get(str(self.rank))
                if off is None:
                    raise WeightTransferError(f"training rank {r} expects no tiles from us")
                self._peer[r] = (
                    MemoryDescriptor.from_bytes(_unb64(m["inbox"])),
                    int(m["inbox_total"]),
                    int(off),
                )
        missing = [d for d in pr.receivers if d not in self._dst]
        missing_p = [q for q in pr.peers if q not in self._peer]
        if missing or missing_p:
            raise WeightTransferError(f"no info from inference {missing} / training {missing_p}")
        # immediates per receiver, from this engine's sharding rules
        counts = {d: 0 for d in pr.receivers}
        all_reqs = [r for b in pr.batches for r in b.requests]
        eng = self.engine
        for req in all_reqs + pr.scale_requests + pr.stamp_requests:
            src = self._regions[req[1]]
            if req[0] == "scatter":
                # each item is cut by its destination's path (NVLink: one copy per item)
                for d, _, _, nbytes in req[2]:
                    counts[d] += eng.imm_count_for(src, self._dst[d][0], nbytes)
            else:  # one op per page on every path (more for pages over the path's op size)
                per = eng.imm_count_for(src, self._dst[req[2]][0], req[3], pin_domain=0)
                counts[req[2]] += req[4] * per
        self._counts = counts
        addr = _b64(self.engine.address.to_bytes())
        fp = self.plan.fingerprint()
        out: Dict[Tuple[str, int], bytes] = {}
        for d, c in counts.items():
            out[("infer", d)] = _dumps(
                {
                    "kind": "hello",
                    "role": "infer",
                    "src": self.rank,
                    "dst": d,
                    "count": c,
                    "fingerprint": fp,
                    "address": addr,
                }
            )
        for q in pr.peers:
            n = self.engine.imm_count_for(
                self.outbox_region, self._peer[q][0], 4 * pr.peer_tiles[q][0].size
            )
            out[("train", q)] = _dumps(
                {
                    "kind": "hello",
                    "role": "train",
                    "src": self.rank,
                    "dst": q,
                    "count": n,
                    "fingerprint": fp,
                    "address": addr,
                }
            )
        if not pr.peers:
            self._amax_expected = 0
        return out

    def accept(self, hellos: Sequence[bytes]) -> None:
        """Takes the hellos of tile-sharing training peers (amax immediates they will send)."""
        counts: Dict[int, int] = {}
        for h in hellos:
            m = _loads(h)
            if m["kind"] == "hello" and m.get("role") == "train" and m["dst"] == self.rank:
                counts[int(m["src"])] = int(m["count"])
        if sorted(counts) != self.prog.peers:
            raise WeightTransferError(
                f"training rank {self.rank}: amax hellos from {sorted(counts)}, "
                f"expected {self.prog.peers}"
            )
        self._amax_expected = sum(counts.values())

    def _submit(
        self, req: _Request, version: int, imm: int, t: float
    ) -> List[Tuple[Any, List[int]]]:
        par = version % (self._slots or 2)  # the slot this version lands in
        src = self._regions[req[1]]
        if req[0] == "scatter":
            items = []
            order: List[int] = []
            for d, so, do, n in req[2]:
                desc, sb = self._dst[d]
                items.append((desc, so, par * sb + do, n))
                if d not in order:
                    order.append(d)
            return [(self.engine.scatter(src, items, imm, timeout=t), order)]
        _, _, d, pb, cnt, so, sst, do, dst = req
        desc, sb = self._dst[d]
        pages = list(range(cnt))
        f = self.engine.write_paged(
            src,
            desc,
            pb,
            pages,
            pages,
            src_stride=sst,
            dst_stride=dst,
            src_offset=so,
            dst_offset=par * sb + do,
            imm=imm,
            timeout=t,
        )
        return [(f, [d])]

    def push(self, version: int, timeout: Optional[float] = None) -> Dict[str, float]:
        """Writes update ``version`` (versions go up by one per update). Returns phase timings.

        Blocks until every write completed locally; waits (up to ``timeout``) for the receivers'
        release of ``version - slots`` before touching the slot of ``version``.
        """
        if self._amax_expected is None:
            raise WeightTransferError("connect() and accept() first")
        t = self.timeout if timeout is None else timeout
        pr = self.prog
        eng = self.engine
        stats: Dict[str, float] = {}
        t0 = time.perf_counter()
        futs: List[Tuple[Any, List[int]]] = []
        # 1. tile maxima, exchanged with peers
        if pr.fp8:
            pr.local_amax()
            par = version % 2
            amax_futs = []
            for q in pr.peers:
                vals = pr.partials(q)
                o = pr.inbox_off[q]
                pr.outbox[o : o + vals.size] = vals
                desc, total, off = self._peer[q]
                amax_futs.append(
                    eng.write(
                        self.outbox_region,
                        4 * o,
                        desc,
                        4 * (par * total + off),
                        4 * vals.size,
                        imm_for(IMM_AMAX, version),
                        timeout=t,
                    )
                )
            if self._amax_expected:
                eng.wait_imm(imm_for(IMM_AMAX, version), self._amax_expected, t)
            inbox = pr.inbox[par * pr.inbox_total : (par + 1) * pr.inbox_total]
            for q in pr.peers:
                o = pr.inbox_off[q]
                pr.merge(q, inbox[o : o + pr.peer_tiles[q][0].size])
            for f in amax_futs:
                f.wait(t)
            pr.finish_scales()
            pr.sync()
        t1 = time.perf_counter()
        stats["amax_s"] = t1 - t0
        # 2. the slot is free once every receiver released the version that was in it
        prev = version - (self._slots or 2)
        if prev in self._pushed and pr.receivers:
            eng.wait_imm(imm_for(IMM_RELEASE, prev), len(pr.receivers), t)
        t2 = time.perf_counter()
        stats["release_wait_s"] = t2 - t1
        imm = imm_for(IMM_DATA, version)
        for r in pr.scale_requests:
            futs.extend(self._submit(r, version, imm, t))
        # 3. the pipeline: fill a staging buffer once its previous writes completed
        ring_futs: Dict[int, List[Any]] = {}
        window: List[List[Any]] = []
        fill_s = 0.0
        for b in pr.batches:
            if b.ring >= 0:
                for f in ring_futs.pop(b.ring, []):
                    f.wait(t)
                tf = time.perf_counter()
                pr.fill(b)
                pr.sync()  # the writes read what the fill wrote
                fill_s += time.perf_counter() - tf
            else:
                if len(window) >= pr.depth:
                    for f in window.pop(0):
                        f.wait(t)
            mine = [x for r in b.requests for x in self._submit(r, version, imm, t)]
            futs.extend(mine)
            if b.ring >= 0:
                ring_futs[b.ring] = [f for f, _ in mine]
            else:
                window.append([f for f, _ in mine])
        # 4. stamps
        pr.stamp[0] = version
        pr.sync()
        for r in pr.stamp_requests:
            futs.extend(self._submit(r, version, imm, t))
        t3 = time.perf_counter()
        got = {d: 0 for d in pr.receivers}
        for f, order in futs:
            f.wait(t)
            for d, c in zip(order, f.imm_counts):
                got[d] += c
        t4 = time.perf_counter()
        if got != self._counts:
            raise WeightTransferError(
                f"rank {self.rank}: sent immediates {got}, promised {self._counts}"
            )
        self._pushed.add(version)
        self._pushed.discard(version - 2)  # (only version - slots is ever looked up)
        stats.update(
            fill_s=fill_s,
            submit_s=t3 - t2 - fill_s,
            drain_s=t4 - t3,
            total_s=t4 - t0,
            writes=float(len(futs)),
        )
        return stats
