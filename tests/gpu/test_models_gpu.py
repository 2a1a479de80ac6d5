"""LongNetLM on CUDA in bf16: every backend against the float32 model, and a training step.

Tolerance rule: the bf16 model's error against the float32 model (same weights) may be at
most twice the error of the bf16 model with dense SDPA attention (PyTorch's own bf16
pipeline), plus 1e-2. Skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dilated_attention_pytorch import available_backends
from dilated_attention_pytorch.models import LongNetLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("backend", available_backends())
def test_bf16_lm_with_one_dense_segment_matches_float32(backend: str) -> None:
    torch.manual_seed(0)
    n = 4096
    dilated = LongNetLM(256, 256, 4, 2, [n], [1], backend=backend, device="cuda")
    dense = LongNetLM(256, 256, 4, 2, attention="dense", device="cuda")
    dense.load_state_dict(dilated.state_dict())
    ids = torch.randint(0, 256, (2, n + 1), device="cuda")
    with torch.no_grad():
        ref = dense(ids[:, :-1]).float()  # float32 reference
        ours = copy.deepcopy(dilated).bfloat16()(ids[:, :-1]).float()
        sdpa = copy.deepcopy(dense).bfloat16()(ids[:, :-1]).float()
    ours_err = (ours - ref).abs().max().item()
    sdpa_err = (sdpa - ref).abs().max().item()
    assert ours_err <= 2 * sdpa_err + 1e-2, (ours_err, sdpa_err)


@pytest.mark.parametrize("backend", available_backends())
def test_bf16_lm_trains_on_cuda(backend: str) -> None:
    torch.manual_seed(0)
    model = LongNetLM(256, 256, 4, 2, [1024, 2048, 8192], [1, 2, 4], backend=backend,
                      device="cuda", dtype=torch.bfloat16)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # A random block of 512 bytes repeated 16 times: after the first copy every byte is
    # predictable only by attending 512 positions back (a unigram model stays at ~5.5).
    block = torch.randint(0, 256, (512,), device="cuda")
    ids = block.repeat(17)[None, :8193]
    losses = []
    for _ in range(60):
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 2.0 < losses[0], losses  # far below the unigram entropy
