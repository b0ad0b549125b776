"""The inference rank's role: :class:`WeightReceiver` (see :mod:`.execute` for the protocol)."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..errors import WeightTransferError
from .slots import WeightSnapshot, slot_layout, unpack_slot
from .tables import WeightPlan
from .wire import IMM_DATA, IMM_RELEASE, _b64, _dumps, _loads, _unb64, imm_for

__all__ = ["WeightReceiver"]


class WeightReceiver:
    """An inference rank: registers slots of parameter memory and waits for updates.

    ``info()`` goes to every training rank; the hellos the senders return go to
    :meth:`accept`. Then :meth:`wait` for each version, read, :meth:`release`.
    ``device="cuda:N"`` keeps the slots in GPU memory (snapshots are then torch tensors); once
    :meth:`wait` returns, every byte of the version is in that memory.

    ``slots=2`` (default): update ``v`` lands in slot ``v % 2`` while ``v - 1`` can still be
    read. ``slots=1`` halves the memory: update ``v`` lands where ``v - 1`` was, so the senders
    wait until ``v - 1`` was released, and a snapshot must not be read after its release (pause
    serving between releasing ``v - 1`` and waiting for ``v``).
    """

    def __init__(
        self,
        engine: Any,
        plan: WeightPlan,
        rank: int,
        *,
        timeout: float = 60.0,
        device: Optional[str] = None,
        slots: int = 2,
    ) -> None:
        if slots not in (1, 2):
            raise WeightTransferError(f"slots must be 1 or 2, got {slots}")
        self.engine = engine
        self.plan = plan
        self.rank = rank
        self.timeout = timeout
        self.layout = slot_layout(plan, rank)
        self.device = device
        self.slots = slots
        self.memory: Any
        total = slots * self.layout.slot_bytes
        if device is None:
            self.memory = np.zeros(total, dtype=np.uint8)
        else:  # torch memory on `device` ("cuda:N": GPU slots; the engine needs cuda_device)
            import torch

            self.memory = torch.zeros(total, dtype=torch.uint8, device=device)
        self.region = engine.register(self.memory)
        self._expected: Optional[int] = None
        self._senders: Dict[int, Any] = {}
        self._landed: set = set()
        # Typed views of each slot, made once: the slots never move, and building a view per
        # tensor on every update costs about 5 us each (half a millisecond for a hundred).
        self._views: Dict[int, WeightSnapshot] = {}
        #: When the last :meth:`wait` saw every write counted (``time.monotonic()``), and how
        #: long it then took to check the stamps and return.
        self.last_wait: Dict[str, float] = {}

    def info(self) -> bytes:
        """Bytes for the training ranks: address, slot descriptor, plan fingerprint."""
        return _dumps(
            {
                "kind": "infer",
                "rank": self.rank,
                "fingerprint": self.plan.fingerprint(),
                "address": _b64(self.engine.address.to_bytes()),
                "slots": _b64(self.region.descriptor.to_bytes()),
                "slot_bytes": self.layout.slot_bytes,
                "num_slots": self.slots,
            }
        )

    def accept(self, hellos: Sequence[bytes]) -> None:
        """Takes the senders' hellos (immediate counts per update); needs one from each sender."""
        from ..engine import Address

        counts: Dict[int, int] = {}
        for h in hellos:
            m = _loads(h)
            if m["kind"] != "hello" or m.get("role") != "infer" or m["dst"] != self.rank:
                continue
            if m["fingerprint"] != self.plan.fingerprint():
                raise WeightTransferError(f"rank {m['src']} holds a different plan")
            counts[int(m["src"])] = int(m["count"])
            self._senders[int(m["src"])] = Address.from_bytes(_unb64(m["address"]))
        if sorted(counts) != list(self.layout.senders):
            raise WeightTransferError(
                f"inference rank {self.rank}: hellos from {sorted(counts)}, "
                f"expected {list(self.layout.senders)}"
            )
        self._expected = sum(counts.values())

    @property
    def expected_imms(self) -> int:
        """Immediates one update brings (all senders together)."""
        if self._expected is None:
            raise WeightTransferError("accept() the senders' hellos first")
        return self._expected

    def slot(self, version: int) -> Any:
        """The bytes of the slot ``version`` lands in."""
        n = self.layout.slot_bytes
        k = version % self.slots
        return self.memory[k * n : (k + 1) * n]

    def ready(self, version: int) -> bool:
        """Whether all of ``version`` has landed (non-blocking)."""
        if version in self._landed:
            return True
        return self.engine.imm_count(imm_for(IMM_DATA, version)) >= self.expected_imms

    def wait(self, version: int, timeout: Optional[float] = None) -> WeightSnapshot:
        """Blocks until every write of ``version`` has landed, checks stamps, returns views.

        Raises ``stolon.TransferTimeoutError`` after ``timeout`` seconds.
        """
        if version not in self._landed:
            t = self.timeout if timeout is None else timeout
            self.engine.wait_imm(imm_for(IMM_DATA, version), self.expected_imms, t)
            self._landed.add(version)
            self._landed.discard(version - self.slots)
        counted = time.monotonic()
        slot = self.slot(version)
        raw = slot[: 8 * len(self.layout.senders)]
        if not isinstance(raw, np.ndarray):
            raw = raw.cpu().numpy()
        stamps = raw.view(np.uint64)
        if np.any(stamps != version):
            raise WeightTransferError(
                f"inference rank {self.rank}: update {version} counted but stamps are "
                f"{stamps.tolist()}"
            )
        k = version % self.slots
        views = self._views.get(k)
        if views is None:
            views = self._views[k] = unpack_slot(self.layout, slot, version)
        self.last_wait = {"counted_at": counted, "check_s": time.monotonic() - counted}
        return WeightSnapshot(version, dict(views.tensors), dict(views.scales))

    def release(self, version: int, timeout: Optional[float] = None) -> None:
        """Tells every sender that the slot of ``version`` may be overwritten (by ``version +
        slots``); with one slot, views of ``version`` must not be read after this."""
        t = self.timeout if timeout is None else timeout
        futs = [
            self.engine.write_imm(a, imm_for(IMM_RELEASE, version), timeout=t)
            for a in self._senders.values()
        ]
        for f in futs:
            f.wait(t)
