"""Block-sparse attention through PyTorch's FlexAttention (compiled Triton kernels, CUDA).

The pattern's kept blocks become a FlexAttention ``BlockMask`` in its own layout: the
off-diagonal kept blocks are *full* blocks (no per-element mask is evaluated) and,
when causal, the diagonal blocks are partial blocks masked by ``kv_idx <= q_idx``.
Dropped blocks are neither loaded nor multiplied. Used by ``backend="flex"`` (and by
``"auto"`` on CUDA where it applies).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .patterns import BlockSparsePattern, kv_block_lists

__all__ = ["flex_block_mask", "flex_block_sparse_attention", "flex_unsupported"]

_COMPILED = None
BLOCK_MASK_CACHE: OrderedDict[tuple[int, str], tuple[BlockSparsePattern, BlockMask]] = OrderedDict()


def flex_unsupported(q: Tensor, pattern: BlockSparsePattern, dropout_p: float) -> list[str]:
    """Why FlexAttention cannot run this call; empty when it can."""
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"flex runs on CUDA, got {q.device.type}")
    if dropout_p != 0.0:
        reasons.append("flex here has no dropout")
    if pattern.block_size % 16 != 0:
        reasons.append(
            f"flex needs a block size that is a multiple of 16, got {pattern.block_size}"
        )
    if pattern.seq_len % pattern.block_size != 0:
        reasons.append("flex needs N to be a multiple of the block size")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"flex runs float16/bfloat16/float32, got {q.dtype}")
    return reasons


def _causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return kv_idx <= q_idx


def flex_block_mask(pattern: BlockSparsePattern, device: torch.device) -> BlockMask:
    """The pattern as a FlexAttention ``BlockMask`` on ``device`` (cached per pattern)."""
    key = (id(pattern), str(device))
    if key in BLOCK_MASK_CACHE:
        BLOCK_MASK_CACHE.move_to_end(key)
        return BLOCK_MASK_CACHE[key][1]
    mask = pattern.block_mask
    mask = mask[None] if mask.dim() == 2 else mask  # (H or 1, Qb, Kb)
    if pattern.is_causal:
        eye = torch.eye(mask.shape[-1], dtype=torch.bool)
        full, partial = mask & ~eye, mask & eye
    else:
        full, partial = mask, torch.zeros_like(mask)
    p_num, p_idx = kv_block_lists(partial)
    f_num, f_idx = kv_block_lists(full)
    # FlexAttention's index lists are as long as the key blocks: same shapes for every
    # pattern of a length, so the compiled kernels are reused.
    nb = mask.shape[-1]
    p_idx = torch.nn.functional.pad(p_idx, (0, nb - p_idx.shape[-1]))
    f_idx = torch.nn.functional.pad(f_idx, (0, nb - f_idx.shape[-1]))

    def dev(t: Tensor) -> Tensor:
        return t[None].to(device=device, dtype=torch.int32).contiguous()

    block_mask = BlockMask.from_kv_blocks(
        dev(p_num), dev(p_idx), dev(f_num), dev(f_idx),
        BLOCK_SIZE=pattern.block_size,
        mask_mod=_causal if pattern.is_causal else None,
        seq_lengths=(pattern.seq_len, pattern.seq_len),
    )  # fmt: skip
    BLOCK_MASK_CACHE[key] = (pattern, block_mask)
    while len(BLOCK_MASK_CACHE) > 32:
        BLOCK_MASK_CACHE.popitem(last=False)
    return block_mask


def flex_block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: BlockSparsePattern, scale: float
) -> tuple[Tensor, Tensor]:
    """``(B, N, H, D)`` q, k, v -> out ``(B, N, H, D)``, lse ``(B, N, H)`` fp32, differentiable.
    k, v with fewer heads (``H_kv`` dividing ``H``): FlexAttention's grouped-query form."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    out, lse = _COMPILED(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=flex_block_mask(pattern, q.device), scale=scale, return_lse=True,
        enable_gqa=k.shape[2] != q.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2), lse.transpose(1, 2).float()
