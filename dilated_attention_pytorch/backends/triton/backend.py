"""The ``triton`` backend: fused, in-place Triton kernels (see :mod:`.triton_kernels`).

Registered on import only when Triton imports (``backends/__init__.py`` guards the
import). ``backend="auto"`` picks it over ``reference`` whenever :meth:`why_not`
returns no reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import AttentionCall, Backend, ForwardContext, register_backend
from .blocks import cudnn_usable
from .triton_kernels import (
    dilated_backward,
    dilated_forward,
    interpreting,
    triton_block_backward,
    triton_block_forward,
)

# Head dims the kernels are compiled for (tl.arange needs a power of two; 16 is the
# smallest tl.dot operand).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


class TritonBackend(Backend):
    name = "triton"
    priority = 10

    def why_not(self, call: AttentionCall) -> list[str]:
        reasons = []
        interpret = interpreting()
        if call.device_type != "cuda" and not (interpret and call.device_type == "cpu"):
            reasons.append(
                f"triton needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {call.device_type!r}"
            )
        low_precision = (torch.float16, torch.bfloat16)
        if call.dtype not in low_precision and not (interpret and call.dtype == torch.float32):
            reasons.append(
                f"triton needs float16/bfloat16 inputs, got {call.dtype} (fp32 matmuls would run "
                f"in tf32; use backend='reference' for full fp32/fp64 precision)"
            )
        if interpret and call.device_type == "cpu" and call.dtype != torch.float32:
            # Seen with Triton 3.6: its CPU interpreter returns wrong bf16 dot products even
            # for a minimal kernel, so CPU runs are limited to float32.
            reasons.append(
                f"under TRITON_INTERPRET=1 on CPU triton runs float32 only (the interpreter "
                f"mis-computes low-precision dots), got {call.dtype}"
            )
        if call.head_dim not in SUPPORTED_HEAD_DIMS:
            reasons.append(f"triton needs head_dim in {SUPPORTED_HEAD_DIMS}, got {call.head_dim}")
        if call.dropout:
            reasons.append(
                "triton does not implement dropout; pass dropout_p=0.0 or use 'reference'"
            )
        return reasons

    def auto_priority(self, call: AttentionCall) -> int:
        # Measured on an H200 (benchmarks/results/dilated_bench_h200_20261121.json, LongNet
        # config, N=1M, bf16): the forward is 1.2-1.6x faster than the reference, but for
        # forward+backward with softmax mixing the reference on cuDNN is faster (triton at
        # 0.97x for D=64, 0.85x for D=128). So "auto" hands those training calls to the
        # reference; with head_split (1.02-1.16x), key padding masks (the reference then
        # falls back to matmuls) or without cuDNN, triton stays first.
        if (
            call.requires_grad
            and call.plan.branch_mixing == "softmax"
            and not call.key_padding_mask
            and call.device_type == "cuda"
            and cudnn_usable(torch.device("cuda"), call.dtype, call.head_dim)
        ):
            return -1
        return self.priority

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        # q, k, v: (B, N, H, D) -> out (B, N, H, D) in q.dtype, lse (B, N, H) fp32
        return dilated_forward(
            q,
            k,
            v,
            ctx.plan,
            scale=ctx.scale,
            causal=ctx.is_causal,
            key_padding_mask=_contiguous_mask(ctx.key_padding_mask),
        )

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
        return dilated_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            ctx.plan,
            scale=ctx.scale,
            causal=ctx.is_causal,
            key_padding_mask=_contiguous_mask(ctx.key_padding_mask),
        )

    # Block ops for the ring (DESIGN.md section 3), the signatures of backends/blocks.py:
    # q (Bb, Lq, Hs, D), k/v (Bb, Lk, Hs, D) -> out (Bb, Lq, Hs, D), lse (Bb, Lq, Hs).
    def block_forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False
    ) -> tuple[Tensor, Tensor]:
        return triton_block_forward(q, k, v, scale=scale, causal=causal)

    def block_backward(
        self,
        dout: Tensor,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        *,
        scale: float,
        causal: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return triton_block_backward(dout, q, k, v, out, lse, scale=scale, causal=causal)


def _contiguous_mask(mask: Tensor | None) -> Tensor | None:
    # The kernels view the bool mask as uint8, which needs a dense last dim.
    return None if mask is None else mask.contiguous()


register_backend(TritonBackend())
