"""``MultiheadDilatedAttention(recompute_qkv=True)`` on CUDA in bf16, every backend.

Against the float32 layer with the same weights, forward and the input's and every
parameter's gradients. Tolerance rule: the recomputing bf16 layer's error may be at most
twice the error of the bf16 layer with separate nodes (``recompute_qkv=False``), plus
1e-3 absolute. Memory: the measured peak of one training step is below the separate
nodes' and within 20% of ``get_memory_estimate``. Skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dilated_attention_pytorch import MultiheadDilatedAttention, available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _step(layer: MultiheadDilatedAttention, x: torch.Tensor, dout: torch.Tensor) -> list:
    x = x.detach().to(layer.q_proj.weight.dtype).requires_grad_()
    out, _ = layer(x, is_causal=True)
    params = list(layer.parameters())
    grads = torch.autograd.grad(out, [x, *params], dout.to(out.dtype))
    return [t.float() for t in (out, *grads)]


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("num_kv_heads", [None, 4])
def test_bf16_recompute_matches_float32(backend: str, num_kv_heads) -> None:
    torch.manual_seed(0)
    # The float32 reference on the pytorch backend (Triton's fp32 dots would be tf32).
    ref_layer = MultiheadDilatedAttention(512, 8, [512, 1024, 2048], [1, 2, 4],
                                          num_kv_heads=num_kv_heads, backend="pytorch",
                                          device="cuda")  # fmt: skip
    x = torch.randn(2, 4096, 512, device="cuda")
    dout = torch.randn(2, 4096, 512, device="cuda")
    ref = _step(ref_layer, x, dout)
    results = {}
    for recompute in (True, False):
        layer = copy.deepcopy(ref_layer).bfloat16()
        layer.attention.backend = backend
        layer.recompute_qkv = recompute
        results[recompute] = _step(layer, x, dout)
    for i, want in enumerate(ref):
        err = (results[True][i] - want).abs().max().item()
        base = (results[False][i] - want).abs().max().item()
        assert err <= 2 * base + 1e-3, (i, err, base)


@pytest.mark.parametrize("backend", available_backends())
def test_recompute_peak_is_lower_and_estimated(backend: str) -> None:
    torch.manual_seed(0)
    N, E, H = 1 << 18, 1024, 16
    peaks = {}
    for recompute in (True, False):
        layer = MultiheadDilatedAttention(
            E, H, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], backend=backend,
            recompute_qkv=recompute, device="cuda", dtype=torch.bfloat16,
        )  # fmt: skip
        x = torch.randn(1, N, E, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn_like(x)
        layer(x)[0].backward(dout)  # warm-up: kernels, cuDNN plans
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        layer(x)[0].backward(dout)
        torch.cuda.synchronize()
        peaks[recompute] = torch.cuda.max_memory_allocated()
        est = layer.get_memory_estimate(N, backend=backend)["bytes_per_device"]
        assert est == pytest.approx(peaks[recompute], rel=0.2), (recompute, est, peaks)
        del layer, x, dout
        torch.cuda.empty_cache()
    assert peaks[True] < 0.8 * peaks[False], peaks
