"""Sequence parallelism over ``torch.distributed``: ring dilated attention. No ``nn.Module`` here."""

from .comm import ring_communicator
from .ring_dilated_attention import ring_dilated_attention
from .sequence import (
    gather_replicated,
    gather_sequence,
    ring_all_gather,
    shard_replicated,
    shard_sequence,
    zigzag_order,
)

__all__ = [
    "gather_replicated",
    "gather_sequence",
    "ring_all_gather",
    "ring_communicator",
    "ring_dilated_attention",
    "shard_replicated",
    "shard_sequence",
    "zigzag_order",
]
