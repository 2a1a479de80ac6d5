"""The ``pytorch`` backend: PyTorch ops only, any device, every feature.

For each branch and each head group (heads sharing one offset, and with grouped-query
attention reading one strided set of K/V heads) it takes strided views of q/k/v (no
gather copies), runs the block attention (PyTorch's cuDNN or
flash attention op on CUDA in fp16/bf16, chunked matmuls otherwise) and merges the
block's ``(out, lse)`` into fp32 accumulators with the LSE rule (the LSE kept as a pair
``hi + lo``, :func:`~dilated_attention_pytorch.segments.merge_lse_`). Memory is ``O(N)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ..dropout import DropoutKeys, token_ids
from ..plan import DilatedPlan, HeadGroup
from ..segments import heads_merge_branches, merge_lse_, scale_dout_by_lse_lo, segment_views
from ..validation import check_choice
from .base import (
    AttentionCall,
    Backend,
    BlockOps,
    Capabilities,
    ForwardContext,
    register_backend,
)
from .blocks import (
    KERNELS,
    block_backward,
    block_forward,
    compute_dtype,
    cudnn_usable,
)

_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Against the float64 oracle on the tests' inputs (<= a few hundred keys per row):
# float64 is exact to roundoff; float32 softmax/matmul error grows like
# sqrt(#keys) * 6e-8, far below 2e-5; fp16/bf16 inputs are computed in float32 on
# the CPU (or by the fused ops on CUDA), so the error is the inputs' rounding
# (2**-11, 2**-8) amplified by at most a few units.
_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


@dataclass(frozen=True)
class Block:
    """One (branch, head group, segment slab) of a plan, as :func:`iter_blocks` yields it."""

    branch_index: int
    group: HeadGroup
    views: dict[str, Tensor]  # per (B, N, H, ...) tensor: (Bb, n, Hs, ...)
    token_views: dict[str, Tensor | None]  # per (B, N) tensor: (Bb, n)


_KV_NAMES = frozenset({"k", "v", "dk", "dv"})


def iter_blocks(
    plan: DilatedPlan, tensors: dict[str, Tensor], token_only: dict[str, Tensor | None]
) -> Iterator[Block]:
    """Every (branch, head group, segment slab) of ``plan`` as strided views.

    ``tensors`` are ``(B, N, H, ...)`` tensors sliced by the group's query heads, except
    ``k``, ``v``, ``dk`` and ``dv`` (``(B, N, H_kv, ...)``), sliced by its K/V heads;
    ``token_only`` are ``(B, N)`` tensors (key masks, token ids) that only get the token
    selection.
    """
    for branch_index, branch in enumerate(plan.branches):
        w, r = branch.segment_length, branch.dilation_rate
        for group in branch.head_groups:
            per_tensor = {
                name: segment_views(
                    t, w, r, group.offset, group.kv_slice if name in _KV_NAMES else group.head_slice
                )
                for name, t in tensors.items()
            }
            per_token = {
                name: (None if t is None else segment_views(t, w, r, group.offset))
                for name, t in token_only.items()
            }
            num_views = len(next(iter(per_tensor.values())))
            for i in range(num_views):
                yield Block(
                    branch_index,
                    group,
                    {name: views[i] for name, views in per_tensor.items()},
                    {
                        name: (None if views is None else views[i])
                        for name, views in per_token.items()
                    },
                )


def head_streams(branch_index: int, group: HeadGroup, num_heads: int, device) -> Tensor:
    """``branch_index * H + h`` for the heads of ``group``: the dropout streams of a block."""
    heads = torch.arange(group.head_start, group.head_stop, group.head_step, device=device)
    return branch_index * num_heads + heads


def _dropout_and_mask(ctx: ForwardContext, q: Tensor) -> dict[str, Tensor | None]:
    """The ``(B, N)`` token tensors the blocks need: key keep mask and dropout token ids."""
    B, N = q.shape[0], q.shape[1]
    return {
        "keep": None if ctx.key_padding_mask is None else ~ctx.key_padding_mask,
        "ids": token_ids(B, N, 0, N, q.device) if ctx.dropout_p > 0.0 else None,
    }


def _block_dropout(ctx: ForwardContext, block: Block) -> DropoutKeys | None:
    ids = block.token_views["ids"]
    if ids is None:
        return None
    # A plan of some heads (plan.heads_plan) draws the streams of those heads in the whole.
    plan = ctx.plan
    streams = head_streams(block.branch_index, block.group, plan.parent_heads, ids.device)
    return DropoutKeys(ctx.dropout_p, ctx.seed, ids, ids, streams + plan.first_head)


class PyTorchBackend(Backend):
    """Dilated attention from PyTorch ops: runs on every device and dtype, every feature.

    Args:
        kernel: the block kernel: ``"auto"`` (cuDNN on Hopper and newer, else flash, in
            fp16/bf16 on CUDA without masks or dropout; chunked matmuls otherwise),
            ``"cudnn"``, ``"flash"`` (PyTorch's fused ops; fp16/bf16 on CUDA, no key
            padding mask, no dropout) or ``"math"`` (chunked matmuls, anywhere).
            Blocks a fused op refuses (e.g. one-token segments on cuDNN) go to the
            next kernel that runs them.

    The registered ``"pytorch"`` backend uses ``kernel="auto"``; pass an instance as
    ``backend=PyTorchBackend(kernel="flash")`` to pin a kernel (e.g. in benchmarks).
    """

    name = "pytorch"
    priority = 0

    def __init__(self, kernel: str = "auto") -> None:
        self.kernel = check_choice("kernel", kernel, KERNELS)
        # How torch.compile's custom operator names this backend (see ops.py).
        self.op_key = self.name if kernel == "auto" else f"{self.name}:{kernel}"
        fused = kernel in ("cudnn", "flash")
        self.capabilities = Capabilities(
            dtypes={"cuda": _LOW_PRECISION} if fused else {"cpu": _ALL_DTYPES, "cuda": _ALL_DTYPES},
            head_dims=tuple(range(8, 257, 8)) if fused else None,
            key_padding_mask=not fused,
            dropout=not fused,
            block_ops=True,
            tolerances=_TOLERANCES,
        )

    def why_not(self, call: AttentionCall) -> list[str]:
        reasons = super().why_not(call)
        if self.kernel == "cudnn" and call.device_type == "cuda" and not reasons:
            if not cudnn_usable(torch.device("cuda"), call.dtype, call.head_dim):
                reasons.append(
                    "kernel='cudnn' needs PyTorch's cuDNN attention on a Hopper or newer GPU "
                    "with head_dim <= 128; use kernel='auto'"
                )
        return reasons

    def block_ops(self) -> BlockOps:
        return BlockOps(
            self.name,
            partial(block_forward, kernel=self.kernel),
            partial(block_backward, kernel=self.kernel),
        )

    def __repr__(self) -> str:
        return f"PyTorchBackend(kernel={self.kernel!r})"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        # q, k, v: (B, N, H, D)
        # -> out (B, N, H, D) in q.dtype, LSE pair (2, B, N, H): lse = pair[0] + pair[1]
        B, N, H, _ = q.shape
        acc_dtype = compute_dtype(q.dtype)
        out_acc = torch.zeros(B, N, H, v.shape[-1], dtype=acc_dtype, device=q.device)
        lse_pair = torch.empty((2, B, N, H), dtype=acc_dtype, device=q.device)
        lse_pair[0].fill_(-math.inf)
        lse_pair[1].zero_()
        tensors = {"q": q, "k": k, "v": v, "out": out_acc, "hi": lse_pair[0], "lo": lse_pair[1]}
        for block in iter_blocks(ctx.plan, tensors, _dropout_and_mask(ctx, q)):
            t = block.views
            out_blk, lse_blk = block_forward(
                t["q"],
                t["k"],
                t["v"],
                scale=ctx.scale,
                causal=ctx.is_causal,
                key_keep=block.token_views["keep"],
                dropout=_block_dropout(ctx, block),
                kernel=self.kernel,
            )
            merge_lse_(t["out"], t["hi"], t["lo"], out_blk, lse_blk)
        return out_acc.to(q.dtype), lse_pair

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
        dq, dk, dv = self._accumulate_grads(dout, q, k, v, out, lse, ctx)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    def backward_into(
        self,
        grads: tuple[Tensor, Tensor, Tensor],
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: ForwardContext,
    ) -> None:
        # The accumulators are cast straight into grads (no input-dtype copy in between).
        accs = self._accumulate_grads(dout, q, k, v, out, lse, ctx)
        for target, acc in zip(grads, accs, strict=True):
            target.copy_(acc)

    def _accumulate_grads(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        ctx: ForwardContext,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The gradients of q, k, v in the compute dtype (fp32, fp64 for fp64)."""
        # lse: the forward's LSE pair (2, B, N, H). The blocks get hi and dout * exp(-lo).
        acc_dtype = compute_dtype(q.dtype)
        if heads_merge_branches(ctx.plan):
            dout = scale_dout_by_lse_lo(dout, lse[1])
        lse = lse[0]
        dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        tensors = {
            "q": q, "k": k, "v": v, "out": out, "dout": dout, "lse": lse,
            "dq": dq, "dk": dk, "dv": dv,
        }  # fmt: skip
        for block in iter_blocks(ctx.plan, tensors, _dropout_and_mask(ctx, q)):
            t = block.views
            dq_blk, dk_blk, dv_blk = block_backward(
                t["dout"],
                t["q"],
                t["k"],
                t["v"],
                t["out"],
                t["lse"],
                scale=ctx.scale,
                causal=ctx.is_causal,
                key_keep=block.token_views["keep"],
                dropout=_block_dropout(ctx, block),
                kernel=self.kernel,
            )
            t["dq"].add_(dq_blk)
            t["dk"].add_(dk_blk)
            t["dv"].add_(dv_blk)
        return dq, dk, dv


register_backend(PyTorchBackend())
