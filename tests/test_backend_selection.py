"""``backend="auto"``: capability reasons, and the same choice for training as for inference."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from dilated_attention_pytorch.backends import AttentionCall, available_backends, select_backend
from dilated_attention_pytorch.plan import make_plan


def _call(
    *,
    mixing: str = "softmax",
    requires_grad: bool,
    mask: bool = False,
    device: str = "cuda",
    packed: bool = False,
):
    return AttentionCall(
        device_type=device,
        dtype=torch.bfloat16,
        head_dim=64,
        is_causal=False,
        dropout=False,
        key_padding_mask=mask,
        plan=make_plan([2048, 4096], [1, 2], 16, mixing),
        requires_grad=requires_grad,
        packed=packed,
    )


def test_auto_on_cpu_picks_pytorch_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="dilated_attention_pytorch"):
        chosen = select_backend("auto", _call(requires_grad=True, device="cpu"))
    if "triton" in available_backends() and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter lets triton run on CPU")
    assert chosen.name == "pytorch"
    assert "chose 'pytorch'" in caplog.text


def test_explicit_backend_that_cannot_run_lists_reasons() -> None:
    if "triton" not in available_backends():
        pytest.skip("triton is not installed")
    call = _call(requires_grad=False)
    call = AttentionCall(**{**call.__dict__, "head_dim": 40, "dropout": True})
    with pytest.raises(
        ValueError, match=r"backend 'triton' cannot run this call: .*head_dim.*dropout"
    ):
        select_backend("triton", call)


def test_auto_takes_triton_for_training_too(monkeypatch) -> None:
    # Measured side by side on an H100 (benchmarks/results/
    # dilated_bench_h100_20261206_auto_training*.json): triton was faster than the pytorch
    # backend on cuDNN for forward+backward in every row, with about half its memory, so
    # auto no longer hands training calls to pytorch where cuDNN runs.
    if "triton" not in available_backends():
        pytest.skip("triton is not installed")
    import sys

    from dilated_attention_pytorch.backends import get_backend

    # As on a Hopper GPU with cuDNN attention (where the old rule applied), wherever the
    # package reads whether cuDNN runs.
    for name, module in list(sys.modules.items()):
        if name.startswith("dilated_attention_pytorch") and hasattr(module, "cudnn_usable"):
            monkeypatch.setattr(module, "cudnn_usable", lambda *a: True)
    for kw in ({}, {"mixing": "head_split"}, {"mask": True}, {"packed": True}):
        for requires_grad in (True, False):
            call = _call(requires_grad=requires_grad, **kw)
            assert select_backend("auto", call).name == "triton", (kw, requires_grad)
            # No backend ranks itself differently for training than for inference.
            for name in available_backends():
                assert get_backend(name).auto_priority(call) == get_backend(name).priority
