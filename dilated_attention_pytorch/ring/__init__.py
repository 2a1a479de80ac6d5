"""The ring family: dilated attention over a sequence shared by the ranks of a ring.

- :class:`StandardRingAttention` (also ``RingDilatedAttention``): on ``(B, N, H, D)``
  q, k, v; :class:`RingMultiheadDilatedAttention`: the multi-head layer on ``(B, N, E)``.
- :class:`DistributedRingAttention`: the ring plus monitoring, activation
  checkpointing and timeouts.
"""

from .distributed import DistributedRingAttention
from .standard import RingDilatedAttention, RingMultiheadDilatedAttention, StandardRingAttention

__all__ = [
    "DistributedRingAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "StandardRingAttention",
]
