"""LongNet models and the parallelism applied to them from outside.

- :class:`LongNetLM`: a causal byte- or token-level language model (``(B, N)`` ids ->
  ``(B, N, V)`` logits, ``targets=`` for the loss, ``generate``).
- :class:`LongNet`: the encoder stack on ``(B, N, E)`` inputs such as image patches.
- :func:`parallelize_longnet`: ring sequence parallelism, DDP/FSDP2 and activation
  checkpointing on a ``DeviceMesh``; :func:`shard_batch` cuts a batch into this rank's
  tokens and positions.
"""

from .longnet import (
    DenseAttention,
    LongNet,
    LongNetBlock,
    LongNetLM,
    RotaryAttention,
    apply_rotary,
    rotary_tables,
)
from .parallel import (
    LocalShardRing,
    mesh_group,
    mesh_mean_loss,
    parallelize_longnet,
    sequence_group,
    shard_batch,
)

__all__ = [
    "DenseAttention",
    "LocalShardRing",
    "LongNet",
    "LongNetBlock",
    "LongNetLM",
    "RotaryAttention",
    "apply_rotary",
    "mesh_group",
    "mesh_mean_loss",
    "parallelize_longnet",
    "rotary_tables",
    "sequence_group",
    "shard_batch",
]
