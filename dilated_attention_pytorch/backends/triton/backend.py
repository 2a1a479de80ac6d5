"""The ``triton`` backend: fused, in-place Triton kernels (:mod:`.kernels`, launched by :mod:`.launch`).

Registered by this package's ``__init__`` (imported only when Triton is installed).
``backend="auto"`` picks it over ``pytorch`` whenever :meth:`~Backend.why_not` returns
no reason, for inference and training alike: measured side by side on an H100
(2026-12-06, ``benchmarks/results/dilated_bench_h100_20261206_auto_training*.json``,
LongNet's 2048..32768 / 1..16 at N = 1M, bf16) it was faster than the pytorch backend on
cuDNN in every row, forward+backward 1.01-1.10x (softmax mixing, D = 128 non-causal the
closest) and 1.25-1.40x (``head_split``), with 0.50-0.58x its peak memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..base import AttentionCall, Backend, BlockOps, Capabilities, ForwardContext
from .launch import (
    dilated_backward,
    dilated_forward,
    interpreting,
    triton_block_backward,
    triton_block_forward,
)

# Head dims the kernels are compiled for (tl.arange needs a power of two; 16 is the
# smallest tl.dot operand).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOW_PRECISION = (torch.float16, torch.bfloat16)

# triton.jit decides when the kernels are defined (at import) whether they are compiled
# for CUDA or run on the CPU by Triton's interpreter (TRITON_INTERPRET=1, for tests), so
# the devices are decided at import too. The interpreter runs float32 only (see why_not).
_INTERPRETER = interpreting()

# Against the float64 oracle on the tests' inputs. float32 (the interpreter): every
# dot in fp32 with fp32 accumulation; softmax/matmul roundoff grows like
# sqrt(#keys) * 6e-8, well under 2e-5 for the <= 100 keys per row of
# tests/test_triton_backend.py. fp16/bf16 (CUDA): the rule of tests/gpu/test_triton_gpu.py
# allows twice the error of PyTorch's own low-precision pipeline (the pytorch backend in
# the same dtype, whose tolerances are (5e-3, 5e-3) and (3e-2, 3e-2)) plus 1e-4 absolute.
_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2 * 5e-3 + 1e-4, 2 * 5e-3),
    torch.bfloat16: (2 * 3e-2 + 1e-4, 2 * 3e-2),
}


class TritonBackend(Backend):
    """Dilated attention in fused Triton kernels, in place on ``(B, N, H, D)`` strides.

    CUDA, float16/bfloat16, head dims 16/32/64/128, causal and key padding masks, no
    dropout; block ops for the ring. Under ``TRITON_INTERPRET=1`` also CPU in float32.
    """

    name = "triton"
    priority = 10
    capabilities = Capabilities(
        dtypes={"cuda": _LOW_PRECISION, **({"cpu": (torch.float32,)} if _INTERPRETER else {})},
        head_dims=SUPPORTED_HEAD_DIMS,
        causal=True,
        key_padding_mask=True,
        dropout=False,
        block_ops=True,
        packed=True,
        tolerances=_TOLERANCES,
    )

    def why_not(self, call: AttentionCall) -> list[str]:
        reasons = super().why_not(call)
        if call.device_type == "cuda" and call.dtype not in _LOW_PRECISION:
            reasons.append(
                "triton's float32 matmuls would run in tf32; use backend='pytorch' for full "
                "float32/float64 precision"
            )
        if call.device_type == "cpu" and not _INTERPRETER:
            reasons.append(
                "triton's kernels run on CUDA; on CPU only through Triton's interpreter "
                "(TRITON_INTERPRET=1 set before importing triton, for tests)"
            )
        if call.device_type == "cpu" and _INTERPRETER and call.dtype != torch.float32:
            # Seen with Triton 3.6: its CPU interpreter returns wrong bf16 dot products even
            # for a minimal kernel.
            reasons.append(
                f"under TRITON_INTERPRET=1 triton runs float32 only (the interpreter "
                f"mis-computes low-precision dots; float16/bfloat16 run on CUDA), got {call.dtype}"
            )
        return reasons

    def block_ops(self) -> BlockOps:
        # The ring's blocks, the signatures of backends/blocks.py.
        return BlockOps(self.name, triton_block_forward, triton_block_backward)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext
    ) -> tuple[Tensor, Tensor]:
        # q, k, v: (B, N, H, D) -> out (B, N, H, D) in q.dtype, LSE pair (2, B, N, H) fp32
        return dilated_forward(q, k, v, ctx.plan, **_options(ctx))

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
        return dilated_backward(dout, q, k, v, out, lse, ctx.plan, **_options(ctx))

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
        # The kernels write the final gradients straight into grads' strides.
        dilated_backward(dout, q, k, v, out, lse, ctx.plan, grads=grads, **_options(ctx))


def _options(ctx: ForwardContext) -> dict:
    """The keyword arguments of :func:`dilated_forward` / :func:`dilated_backward`."""
    mask = ctx.key_padding_mask
    return dict(
        scale=ctx.scale,
        causal=ctx.is_causal,
        # The kernels view the bool mask as uint8, which needs a dense last dim.
        key_padding_mask=None if mask is None else mask.contiguous(),
        documents=ctx.documents,
    )
