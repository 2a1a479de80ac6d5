"""Large logits and non-finite values on CUDA, in bf16, for the triton and pytorch backends.

At logit scales >= 1e3 every row's softmax is one-hot (checked: the best score leads by
more than 30), so the exact answer copies one value row, averaged over the branches that
share it, and every gradient is computed from probabilities that are exactly 0 or
1/(#branches sharing the key). bf16 inputs are exact in the float64 oracle; the only
rounding left is the bf16 output (2**-8 relative), so the tolerance is 2e-2 of each
tensor's natural size. A merge that sums branches, or a backward whose scores are
rounded differently from the forward's, is off by a factor (0.3 to inf), far above it.
Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import dense_dilated_attention, dilated_attention
from dilated_attention_pytorch.backends import PyTorchBackend
from dilated_attention_pytorch.oracle import dilated_count_mask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

WS, RS = [64, 256, 1024], [1, 2, 4]


def _one_hot_inputs(N, H, D, logit_scale, causal, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", generator=gen) for _ in range(3))
    q, k, v = ((t * s).bfloat16() for t, s in ((q, logit_scale), (k, logit_scale), (v, 1.0)))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D**-0.5
    if causal:
        s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    top = s.topk(2, dim=-1).values
    gap = top[..., 0] - top[..., 1]
    assert (gap[torch.isfinite(gap)] > 30).all()
    return q, k, v


def _errors(backend, ws, rs, q, k, v, causal) -> list[float]:
    D = q.shape[-1]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = dilated_attention(*leaves, ws, rs, is_causal=causal, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    ref = dense_dilated_attention(*refs, ws, rs, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, refs, dout.double())
    g, vm = dout.abs().max().double(), v.abs().max().double()
    norms = (vm, g * vm * k.abs().max() * D**-0.5, g * vm * q.abs().max() * D**-0.5, g)
    errors = [
        ((a.double() - b).abs().max() / n).item()
        for a, b, n in zip((out, *grads), (ref, *ref_grads), norms, strict=True)
    ]
    return errors


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("logit_scale", [1e3, 1e4])
def test_large_logits_bf16_triton(causal, logit_scale) -> None:
    N, H, D = 1024, 4, 64
    q, k, v = _one_hot_inputs(N, H, D, logit_scale, causal, seed=int(logit_scale) + causal)
    for ws, rs in ((WS, RS), ([N], [1])):
        errors = _errors("triton", ws, rs, q, k, v, causal)
        assert max(errors) < 2e-2, (ws, errors)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("logit_scale", [1e3, 1e4])
def test_large_logits_bf16_pytorch_as_accurate_as_one_branch(causal, logit_scale) -> None:
    # PyTorch's cuDNN op is itself off at these scales for a single dense segment (its
    # backward rebuilds P from a float32 LSE that cannot hold the row's exact maximum), so
    # the bound here is that op's own error: three merged branches must not add to it.
    N, H, D = 1024, 4, 64
    q, k, v = _one_hot_inputs(N, H, D, logit_scale, causal, seed=int(logit_scale) + causal)
    one = _errors("pytorch", [N], [1], q, k, v, causal)
    three = _errors("pytorch", WS, RS, q, k, v, causal)
    for a, b in zip(three, one, strict=True):
        assert a <= 2 * b + 2e-2, (three, one)


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_nan_at_padding_keys_bf16(backend) -> None:
    N, H, D = 1024, 4, 64
    q, k, v = (torch.randn(2, N, H, D, device="cuda").bfloat16() for _ in range(3))
    pad = torch.rand(2, N, device="cuda") < 0.3
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[pad], v_bad[pad] = float("nan"), float("inf")
    leaves = [t.requires_grad_() for t in (q.clone(), k_bad, v_bad)]
    out = dilated_attention(*leaves, WS, RS, key_padding_mask=pad, backend=backend)
    assert torch.isfinite(out).all()
    clean = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dilated_attention(*clean, WS, RS, key_padding_mask=pad, backend=backend)
    torch.testing.assert_close(out, ref)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, clean, dout)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "backend", ["triton", PyTorchBackend(kernel="math")], ids=["triton", "math"]
)
def test_causal_inf_value_reaches_only_its_readers_bf16(backend) -> None:
    # PyTorch's fused cuDNN/flash ops multiply masked probabilities by the values inside
    # their diagonal tile, so there a non-finite future value reaches earlier rows of the
    # tile (as in F.scaled_dot_product_attention); the library's own kernels do not.
    N, H, D, t = 1024, 4, 64, 300
    q, k, v = (torch.randn(1, N, H, D, device="cuda").bfloat16() for _ in range(3))
    v[:, t] = float("inf")
    out = dilated_attention(q, k, v, WS, RS, is_causal=True, backend=backend)
    readers = dilated_count_mask(N, H, WS, RS, is_causal=True)[:, :, t] > 0  # (H, N)
    non_finite = ~torch.isfinite(out).all(dim=-1)[0].T.cpu()
    assert torch.equal(non_finite, readers), (non_finite.sum(), readers.sum())


@pytest.mark.parametrize("backend", ["triton", "pytorch"])
def test_nan_key_reaches_every_reader_bf16(backend) -> None:
    # On a GPU the row maximum skips NaN scores, so a row whose only unpadded key in a
    # branch is NaN keeps m = -inf; its NaN must survive the later branches' merges.
    # Rows 0 and 4 read key 8 only in the w = 16, r = 4 branch (the other keys they read
    # there and in w = 8, r = 2 are padding).
    N, H, D, ws, rs = 16, 1, 16, [4, 8, 16], [1, 2, 4]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, N, H, D, device="cuda", generator=gen).bfloat16() for _ in range(3))
    pad = torch.zeros(1, N, dtype=torch.bool, device="cuda")
    pad[0, [0, 2, 4, 6, 12]] = True
    k[:, 8] = float("nan")
    out = dilated_attention(q, k, v, ws, rs, key_padding_mask=pad, backend=backend)
    readers = dilated_count_mask(N, H, ws, rs)[:, :, 8] > 0  # (H, N); key 8 is not padding
    non_finite = ~torch.isfinite(out).all(dim=-1)[0].T.cpu()
    assert torch.equal(non_finite, readers), (non_finite.nonzero(), readers.nonzero())
