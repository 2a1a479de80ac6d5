"""Grouped-query attention and packed documents on CUDA (bf16), every backend and kernel.

The fp32 truth is the ``pytorch`` backend's matmul path on fp32 copies of the inputs
(tested against the dense oracle on the CPU, GQA and packing included). Tolerance rule
(flash-attn's, as in test_triton_gpu.py): a path's error against that truth is at most
twice the error of the multi-head call on K/V repeated by hand, in bf16 on the same path
(what a user without GQA support would run), plus 1e-4. Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import PyTorchBackend, dilated_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

EPS = 1e-4
WS, RS = [512, 1024, 2048], [1, 2, 4]


def _run(q, k, v, backend, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = dilated_attention(q, k, v, WS, RS, is_causal=True, backend=backend, **kw)
    dout = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out).to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return [out.detach(), *grads]


def _check(got, want, low) -> None:
    for name, g, w, lo in zip(("out", "dq", "dk", "dv"), got, want, low, strict=True):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - w.double()).abs().max().item()
        low_err = (lo.double() - w.double()).abs().max().item()
        assert err <= 2 * low_err + EPS, f"{name}: error {err:.3g} vs {low_err:.3g}"


def _repeated(k, g):
    return k.repeat_interleave(g, dim=2)


@pytest.mark.parametrize(
    "backend", ["triton", PyTorchBackend(kernel="cudnn"), PyTorchBackend(kernel="flash")],
    ids=["triton", "cudnn", "flash"],
)  # fmt: skip
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_grouped_query_attention(backend, kv_heads) -> None:
    torch.manual_seed(0)
    H, N, D = 16, 8192, 64
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, N, kv_heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    g = H // kv_heads
    want = _run(q.float(), k.float(), v.float(), PyTorchBackend(kernel="math"))
    got = _run(q, k, v, backend)
    # The multi-head call on repeated K/V, its K/V gradients summed back.
    low = _run(q, _repeated(k, g), _repeated(v, g), backend)
    low[2:] = [x.view(1, N, kv_heads, g, D).sum(3) for x in low[2:]]
    _check(got, want, low)


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_packed_documents(backend) -> None:
    torch.manual_seed(1)
    lengths = [3000, 17, 9000, 1024, 3343]
    N, H, D = sum(lengths), 8, 64
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    q = torch.randn(1, N, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, N, 2, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    want = _run(q.float(), k.float(), v.float(), PyTorchBackend(kernel="math"), cu_seqlens=cu)
    got = _run(q, k, v, backend, cu_seqlens=cu)
    # The documents one by one, K/V repeated: what a user without either feature runs.
    bounds = cu.tolist()
    parts = [
        _run(q[:, a:b], _repeated(k[:, a:b], 4), _repeated(v[:, a:b], 4), backend)
        for a, b in zip(bounds, bounds[1:])
    ]
    low = [torch.cat([p[i] for p in parts], dim=1) for i in range(4)]
    low[2:] = [x.view(1, N, 2, 4, D).sum(3) for x in low[2:]]
    _check(got, want, low)
