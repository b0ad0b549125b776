"""What the weight-transfer ranks tell each other: immediates and connect-time messages.

Every write of update ``v`` carries the immediate ``DATA(v)``; tile maxima between training ranks
carry ``AMAX(v)`` and a receiver's release of ``v`` is a zero-byte write with ``RELEASE(v)``.
Infos and hellos (:meth:`WeightSender.info`, :meth:`WeightReceiver.accept`...) are JSON bytes,
with descriptors and addresses in base64, so they go over any channel.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict

from ..errors import WeightTransferError

__all__ = ["IMM_DATA", "IMM_AMAX", "IMM_RELEASE", "imm_for"]

#: Immediate kinds (top 4 bits); the low 28 bits carry the update version.
IMM_DATA = 0xA
IMM_AMAX = 0xB
IMM_RELEASE = 0xC
_VERSION_MASK = (1 << 28) - 1


def imm_for(kind: int, version: int) -> int:
    """The 32-bit immediate of ``kind`` for update ``version``."""
    return (kind << 28) | (version & _VERSION_MASK)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _dumps(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def _loads(b: bytes) -> Dict[str, Any]:
    try:
        out = json.loads(bytes(b).decode())
    except ValueError as e:
        raise WeightTransferError(f"malformed weight-transfer message: {e}") from None
    if not isinstance(out, dict) or "kind" not in out:
        raise WeightTransferError("malformed weight-transfer message")
    return out
