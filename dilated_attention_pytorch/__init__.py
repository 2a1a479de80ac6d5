"""LongNet dilated attention and ring (sequence-parallel) dilated attention for PyTorch."""

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
from .functional import dilated_attention
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
    "make_plan",
    "register_attention_kind",
]
