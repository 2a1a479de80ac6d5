"""Operations features for distributed training: the monitored, checkpointed ring
(:class:`DistributedRingAttention`) and the data-parallel multi-head layer
(:class:`EnterpriseDistributedDilatedAttention`)."""

from .operations import DistributedRingAttention
from .ring_distributed_dilated_attention import EnterpriseDistributedDilatedAttention

__all__ = ["DistributedRingAttention", "EnterpriseDistributedDilatedAttention"]
