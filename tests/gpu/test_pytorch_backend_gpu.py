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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_on_cuda_drops_what_the_cpu_drops(dtype) -> None:
    # The dropped entries are a hash of (seed, branch, head, positions): the same on
    # every device, so CUDA and CPU agree up to the arithmetic's rounding.
    B, N, H, D = 2, 1024 + 7, 4, 32
    ws, rs = [128, 512, 2048], [1, 2, 4]
    q, k, v, dout = (torch.randn(B, N, H, D, dtype=dtype) for _ in range(4))
    mask = torch.rand(B, N) < 0.2
    results = []
    for device in ("cpu", "cuda"):
        qq, kk, vv = (t.to(device).requires_grad_() for t in (q, k, v))
        torch.manual_seed(5)
        out = dilated_attention(
            qq, kk, vv, ws, rs, dropout_p=0.3, key_padding_mask=mask.to(device), is_causal=True
        )
        grads = torch.autograd.grad(out, (qq, kk, vv), dout.to(device))
        results.append([t.float().cpu() for t in (out, *grads)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # both compute in fp32; bf16 outputs
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
