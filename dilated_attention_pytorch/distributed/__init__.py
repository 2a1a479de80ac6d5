"""Sequence parallelism over ``torch.distributed``: ring dilated attention. No ``nn.Module`` here."""

from .ring_dilated_attention import ring_dilated_attention
from .sequence import gather_sequence, shard_sequence

__all__ = ["gather_sequence", "ring_dilated_attention", "shard_sequence"]
