"""The ``reference`` backend: public PyTorch ops only, any device, every feature.

For each branch and each head group (heads sharing one offset) it takes strided
views of q/k/v (no gather copies), runs the block attention (PyTorch's flash
kernel on CUDA in fp16/bf16, chunked matmuls otherwise) and merges the block's
``(out, lse)`` into fp32 accumulators with the LSE rule. Memory is ``O(N)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from ..plan import DilatedPlan
from ..segments import merge_lse_, segment_views
from .base import AttentionCall, Backend, ForwardContext, register_backend
from .blocks import block_backward, block_forward, compute_dtype


def _block_seed(seed: int, *indices: int) -> int:
    # Distinct, reproducible dropout seeds per block; forward and backward agree.
    for i in indices:
        seed = (seed * 1_000_003 + i + 1) & 0x7FFF_FFFF_FFFF_FFFF
    return seed << 16  # leave room for the per-chunk index added in blocks.py


def iter_blocks(
    plan: DilatedPlan, tensors: dict[str, Tensor], token_only: dict[str, Tensor | None]
) -> Iterator[tuple[int, dict[str, Tensor], dict[str, Tensor | None]]]:
    """Yield ``(block_id, views, token_views)`` for every (branch, head group, segment slab).

    ``tensors`` are ``(B, N, H, ...)`` tensors sliced by heads; ``token_only`` are
    ``(B, N)`` tensors (key masks) that only get the token selection.
    """
    block_id = 0
    for branch in plan.branches:
        w, r = branch.segment_length, branch.dilation_rate
        for group in branch.head_groups:
            per_tensor = {
                name: segment_views(t, w, r, group.offset, group.head_slice)
                for name, t in tensors.items()
            }
            per_token = {
                name: (None if t is None else segment_views(t, w, r, group.offset))
                for name, t in token_only.items()
            }
            num_views = len(next(iter(per_tensor.values())))
            for i in range(num_views):
                yield (
                    block_id,
                    {name: views[i] for name, views in per_tensor.items()},
                    {
                        name: (None if views is None else views[i])
                        for name, views in per_token.items()
                    },
                )
                block_id += 1


class ReferenceBackend(Backend):
    name = "reference"
    priority = 0

    def why_not(self, call: AttentionCall) -> list[str]:
        return []

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        # q, k, v: (B, N, H, D)
        B, N, H, _ = q.shape
        acc_dtype = compute_dtype(q.dtype)
        out_acc = torch.zeros(B, N, H, v.shape[-1], dtype=acc_dtype, device=q.device)
        lse_acc = torch.full((B, N, H), -math.inf, dtype=acc_dtype, device=q.device)
        keep = None if ctx.key_padding_mask is None else ~ctx.key_padding_mask
        blocks = iter_blocks(
            ctx.plan, {"q": q, "k": k, "v": v, "out": out_acc, "lse": lse_acc}, {"keep": keep}
        )
        for block_id, t, m in blocks:
            out_blk, lse_blk = block_forward(
                t["q"],
                t["k"],
                t["v"],
                scale=ctx.scale,
                causal=ctx.is_causal,
                key_keep=m["keep"],
                dropout_p=ctx.dropout_p,
                seed=_block_seed(ctx.seed, block_id),
            )
            merge_lse_(t["out"], t["lse"], out_blk, lse_blk)
        return out_acc.to(q.dtype), lse_acc

    def backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: ForwardContext,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc_dtype = compute_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        keep = None if ctx.key_padding_mask is None else ~ctx.key_padding_mask
        tensors = {
            "q": q, "k": k, "v": v, "out": out, "dout": dout, "lse": lse,
            "dq": dq, "dk": dk, "dv": dv,
        }  # fmt: skip
        for block_id, t, m in iter_blocks(ctx.plan, tensors, {"keep": keep}):
            dq_blk, dk_blk, dv_blk = block_backward(
                t["dout"],
                t["q"],
                t["k"],
                t["v"],
                t["out"],
                t["lse"],
                scale=ctx.scale,
                causal=ctx.is_causal,
                key_keep=m["keep"],
                dropout_p=ctx.dropout_p,
                seed=_block_seed(ctx.seed, block_id),
            )
            t["dq"].add_(dq_blk)
            t["dk"].add_(dk_blk)
            t["dv"].add_(dv_blk)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


register_backend(ReferenceBackend())
