"""Reference backend on CUDA (PyTorch flash op on strided views) in bf16/fp16.

Tolerance rule (flash-attn's): against the float32 oracle, our error may be at most
twice the error of the same oracle computed in the low precision, plus a small eps.
Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("N", [2048, 3000 + 97])
def test_reference_cuda_low_precision(dtype, is_causal, branch_mixing, N) -> None:
    B, H, D = 2, 8, 64
    ws, rs = [256, 1024, 4096], [1, 4, 16]
    q, k, v = (
        torch.randn(B, N, H, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
    )
    kwargs = dict(is_causal=is_causal, branch_mixing=branch_mixing)
    out = dilated_attention(q, k, v, ws, rs, backend="pytorch", **kwargs)
    ref = dense_dilated_attention(q, k, v, ws, rs, upcast=True, **kwargs)
    low = dense_dilated_attention(q, k, v, ws, rs, upcast=False, **kwargs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    low_grads = torch.autograd.grad(low, (q, k, v), dout)
    pairs = [("out", out, ref, low)] + [
        (f"d{n}", g, rg, lg) for n, g, rg, lg in zip("qkv", grads, ref_grads, low_grads)
    ]
    for name, x, r, lo in pairs:
        err = (x.double() - r.double()).abs().max().item()
        low_err = (lo.double() - r.double()).abs().max().item()
        assert err <= 2 * low_err + 1e-4, (
            f"{name}: error {err:.3g} vs low-precision oracle {low_err:.3g}"
        )
