"""Executing a plan on every update: training ranks write, inference ranks wait (CPU path).

Roles
-----
- :class:`WeightReceiver` (one per inference rank) registers one region holding **two slots**
  (or one, ``slots=1``); update ``v`` lands in slot ``v % slots``. It learns that ``v`` has
  fully landed by waiting for an exact count of immediate ``DATA(v)`` (the sum of what each
  training rank promised at connect time), checks a per-sender version stamp, and hands out
  read-only views. When it stops reading a version it calls :meth:`WeightReceiver.release`, a
  zero-byte write with immediate ``RELEASE(v)`` to each of its senders. It runs no collective
  and never writes weights.
- :class:`WeightSender` (one per training rank) executes its share of the plan: for fp8
  parameters it first agrees on tile scales with the training peers that share tiles (partial
  ``max |x|`` written one-sidedly into their ``amax`` inbox, counted with ``AMAX(v)``), then
  waits until every receiver released ``v - slots`` (so the slot of ``v`` is free), then
  streams the plan's ranges: directly from its registered parameter buffers when no conversion
  is needed, otherwise through a ring of ``depth`` staging buffers of ``staging_bytes`` each
  (gather, optionally convert, write; a buffer is refilled only after its writes completed,
  which bounds memory), writes its tile scales and finally its version stamps. Every write of
  update ``v`` carries ``DATA(v)``.

Nothing depends on the order in which writes land: the receiver counts immediates. Descriptors,
addresses and counts are exchanged as bytes (:meth:`info`, :meth:`connect`, :meth:`accept`)
over any channel.

:func:`simulate` runs the same per-rank programs with memory copies instead of an engine (for
tests and for checking a plan in one process).

Where it lives: the immediates and messages in :mod:`.wire`, the slot memory map in
:mod:`.slots`, a training rank's program in :mod:`.program`, the roles in :mod:`.receiver` and
:mod:`.sender`, :func:`simulate` in :mod:`.simulation`; every name stays importable from here.
"""

from __future__ import annotations

from ..errors import WeightTransferError
from .receiver import WeightReceiver
from .sender import WeightSender
from .simulation import simulate
from .slots import ShardEntry, SlotLayout, WeightSnapshot, slot_layout, unpack_slot
from .wire import IMM_AMAX, IMM_DATA, IMM_RELEASE, imm_for

__all__ = [
    "IMM_DATA",
    "IMM_AMAX",
    "IMM_RELEASE",
    "imm_for",
    "WeightTransferError",
    "ShardEntry",
    "SlotLayout",
    "slot_layout",
    "WeightSnapshot",
    "WeightReceiver",
    "WeightSender",
    "simulate",
    "unpack_slot",
]
