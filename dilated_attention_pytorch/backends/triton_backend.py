"""The ``triton`` backend: fused, in-place Triton kernels (see :mod:`.triton_kernels`).

Registered on import only when Triton imports (``backends/__init__.py`` guards the
import). ``backend="auto"`` picks it over ``reference`` whenever :meth:`why_not`
returns no reason.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import AttentionCall, Backend, ForwardContext, register_backend
from .triton_kernels import dilated_backward, dilated_forward, interpreting

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
        if call.head_dim not in SUPPORTED_HEAD_DIMS:
            reasons.append(f"triton needs head_dim in {SUPPORTED_HEAD_DIMS}, got {call.head_dim}")
        if call.dropout:
            reasons.append(
                "triton does not implement dropout; pass dropout_p=0.0 or use 'reference'"
            )
        return reasons

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


def _contiguous_mask(mask: Tensor | None) -> Tensor | None:
    # The kernels view the bool mask as uint8, which needs a dense last dim.
    return None if mask is None else mask.contiguous()


register_backend(TritonBackend())
