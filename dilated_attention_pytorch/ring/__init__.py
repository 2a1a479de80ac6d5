"""The ring family: dilated attention over a sequence shared by the ranks of a ring.

- :class:`StandardRingAttention` (also ``RingDilatedAttention``): on ``(B, N, H, D)``
  q, k, v; :class:`RingMultiheadDilatedAttention`: the multi-head layer on ``(B, N, E)``.
- :class:`HilbertRingAttention` / :class:`HilbertRingMultiheadAttention`: the ring over
  image patches in Hilbert-curve order.
- :class:`DistributedRingAttention`: the ring plus monitoring, activation
  checkpointing and timeouts.
- :class:`RingBlockSparseAttention`: block-sparse attention over the ring, moving only
  the key/value blocks some local query keeps.
- :class:`EnterpriseDistributedDilatedAttention`: the multi-head layer for data-parallel
  training (whole sequence on every rank) with monitoring and checkpointing.
"""

from ..sparse.modules import RingBlockSparseAttention
from .config import RING_PRESETS, RingAttentionConfig
from .distributed import DistributedRingAttention, EnterpriseDistributedDilatedAttention
from .factory import RING_IMPLEMENTATIONS, create_ring_attention, create_ring_attention_from_preset
from .hilbert import HilbertRingAttention, HilbertRingMultiheadAttention
from .standard import RingDilatedAttention, RingMultiheadDilatedAttention, StandardRingAttention

__all__ = [
    "RING_IMPLEMENTATIONS",
    "RING_PRESETS",
    "RingAttentionConfig",
    "create_ring_attention",
    "create_ring_attention_from_preset",
    "DistributedRingAttention",
    "EnterpriseDistributedDilatedAttention",
    "HilbertRingAttention",
    "HilbertRingMultiheadAttention",
    "RingBlockSparseAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "StandardRingAttention",
]
