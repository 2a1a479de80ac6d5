"""The ring with operations features: monitoring, activation checkpointing, timeouts."""

from .operations import DistributedRingAttention

__all__ = ["DistributedRingAttention"]
