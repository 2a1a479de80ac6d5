"""LongNet dilated attention, ring (sequence-parallel) attention and block-sparse attention.

Layout: every attention function and module here takes ``q``, ``k``, ``v`` of shape
``(B, N, H, D)`` (batch, tokens, heads, head dim), *not* the ``(B, H, N, D)`` of
``torch.nn.functional.scaled_dot_product_attention``; the multi-head layers take
``(B, N, E)``.

Quick start::

    import torch
    from dilated_attention_pytorch import MultiheadDilatedAttention, dilated_attention

    q, k, v = (torch.randn(1, 8192, 8, 64) for _ in range(3))
    out = dilated_attention(q, k, v, segment_lengths=[2048, 4096, 8192],
                            dilation_rates=[1, 2, 4])          # (1, 8192, 8, 64)
    layer = MultiheadDilatedAttention(512, 8, [2048, 4096, 8192], [1, 2, 4])
    y, _ = layer(torch.randn(1, 8192, 512))                    # (1, 8192, 512)

What is here:

- ``dilated_attention`` / ``DilatedAttention`` / ``MultiheadDilatedAttention``: LongNet
  dilated attention on one device (backends ``"pytorch"`` and ``"triton"``).
- ``StandardRingAttention``, ``RingMultiheadDilatedAttention``, ``HilbertRingAttention``,
  ``ring_dilated_attention``, ``create_ring_attention``: the same attention with the
  sequence split over the ranks of a ``torch.distributed`` group.
- ``block_sparse_attention``, ``BlockSparseAttention``, ``RingBlockSparseAttention``,
  ``make_block_sparse_pattern``: attention over the kept blocks of a pattern.
- ``get_memory_estimate`` and the modules' ``get_memory_estimate``: memory before running.
- ``dilated_attention_pytorch.models``: ``LongNetLM`` (a causal language model),
  ``LongNet`` (the encoder) and ``parallelize_longnet`` (ring sequence parallelism,
  DDP/FSDP2 and activation checkpointing applied from outside the model).
- ``dilated_attention_pytorch.decoding``: ``DilatedKVCache`` and
  ``cached_dilated_attention`` for token-by-token causal decoding.
- ``dense_dilated_attention``: the dense ``O(N^2)`` reference the tests compare against.

``explain_backend(q, segment_lengths, dilation_rates)`` says which backend
``backend="auto"`` runs for such a call and why faster ones cannot.

The README (on the package index and in the repository) covers the API, the backends
and the measurements; the repository's ``docs/computation.md`` defines exactly what is
computed and ``docs/ring.md`` states the ring's contract.
"""

import sys

from . import compat
from .backends import PyTorchBackend, available_backends
from .config import PRESETS, DilatedAttentionConfig
from .distributed import gather_sequence, ring_dilated_attention, shard_sequence
from .factory import (
    available_attention_kinds,
    create_dilated_attention,
    create_multihead_dilated_attention,
    register_attention_kind,
)
from .functional import dilated_attention, explain_backend
from .hilbert import hilbert_permutation, inverse_permutation
from .memory import get_memory_estimate
from .modules import DilatedAttention, MultiheadDilatedAttention
from .oracle import dense_dilated_attention
from .plan import DilatedPlan, attended_pairs, attention_flops, make_plan
from .ring import (
    RING_PRESETS,
    DistributedRingAttention,
    EnterpriseDistributedDilatedAttention,
    HilbertRingAttention,
    HilbertRingMultiheadAttention,
    RingAttentionConfig,
    RingBlockSparseAttention,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
    create_ring_attention,
    create_ring_attention_from_preset,
)
from .sparse import (
    BlockSparseAttention,
    BlockSparsePattern,
    block_sparse_attention,
    create_block_sparse_attention,
    make_block_sparse_pattern,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # Deprecated names (see compat): resolved on access, with a DeprecationWarning.
    if name == "ring_dilated_attention_v2":
        return sys.modules[f"{__name__}.{name}"]
    return compat.deprecated_attribute(__name__, name)


__all__ = [
    "BlockSparseAttention",
    "BlockSparsePattern",
    "RingBlockSparseAttention",
    "block_sparse_attention",
    "create_block_sparse_attention",
    "make_block_sparse_pattern",
    "get_memory_estimate",
    "RING_PRESETS",
    "RingAttentionConfig",
    "create_ring_attention",
    "create_ring_attention_from_preset",
    "hilbert_permutation",
    "inverse_permutation",
    "DistributedRingAttention",
    "EnterpriseDistributedDilatedAttention",
    "HilbertRingAttention",
    "HilbertRingMultiheadAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "StandardRingAttention",
    "gather_sequence",
    "ring_dilated_attention",
    "shard_sequence",
    "PRESETS",
    "PyTorchBackend",
    "attended_pairs",
    "attention_flops",
    "DilatedAttention",
    "DilatedAttentionConfig",
    "DilatedPlan",
    "MultiheadDilatedAttention",
    "available_attention_kinds",
    "available_backends",
    "create_dilated_attention",
    "create_multihead_dilated_attention",
    "dense_dilated_attention",
    "dilated_attention",
    "explain_backend",
    "make_plan",
    "register_attention_kind",
]
