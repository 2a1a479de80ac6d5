"""Sequence parallelism over ``torch.distributed``: ring dilated attention. No ``nn.Module`` here."""

from .ring_dilated_attention import ring_dilated_attention
from .sequence import (
    gather_replicated,
    gather_sequence,
    ring_all_gather,
    shard_replicated,
    shard_sequence,
)

__all__ = [
    "gather_replicated",
    "gather_sequence",
    "ring_all_gather",
    "ring_dilated_attention",
    "shard_replicated",
    "shard_sequence",
]
