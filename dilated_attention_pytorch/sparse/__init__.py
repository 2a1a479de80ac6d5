"""Block-sparse attention: named patterns, the attention over their kept blocks, modules."""

from .functional import block_sparse_attention, clear_sparse_caches
from .memory import block_sparse_memory_estimate
from .modules import BlockSparseAttention, RingBlockSparseAttention, create_block_sparse_attention
from .patterns import (
    PATTERN_TYPES,
    BlockSparsePattern,
    kv_block_lists,
    make_block_sparse_pattern,
    pattern_from_block_mask,
)

__all__ = [
    "BlockSparseAttention",
    "RingBlockSparseAttention",
    "create_block_sparse_attention",
    "PATTERN_TYPES",
    "BlockSparsePattern",
    "block_sparse_attention",
    "block_sparse_memory_estimate",
    "clear_sparse_caches",
    "kv_block_lists",
    "make_block_sparse_pattern",
    "pattern_from_block_mask",
]
