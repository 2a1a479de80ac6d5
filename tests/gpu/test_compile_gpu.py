"""torch.compile(fullgraph=True) on CUDA: every backend, compiled == eager (bf16)."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import MultiheadDilatedAttention, available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "cu_seqlens"])
@pytest.mark.parametrize("backend", available_backends())
def test_layer_compiles_on_cuda(backend: str, packed: bool) -> None:
    torch.manual_seed(0)
    layer = MultiheadDilatedAttention(256, 4, [512, 1024, 4096], [1, 2, 4], backend=backend,
                                      device="cuda", dtype=torch.bfloat16)  # fmt: skip
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    kw = {}
    if packed:  # packed documents: the offsets are read inside the operator
        x = x.detach().view(1, 8192, 256).requires_grad_()
        kw["cu_seqlens"] = torch.tensor([0, 1000, 5000, 5100, 8192], device="cuda")
    results = []
    for module in (layer, compiled):
        x.grad = None
        out, _ = module(x, is_causal=True, **kw)
        out.float().square().mean().backward()
        results.append((out.float(), x.grad.float()))
    (a, ga), (b, gb) = results
    # The attention op is the same kernel in both; only the code around it may fuse.
    assert (a - b).abs().max().item() <= 2e-2 * a.abs().max().item()
    assert (ga - gb).abs().max().item() <= 2e-2 * ga.abs().max().item()
