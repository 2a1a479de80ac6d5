"""``backend="auto"``: capability reasons, and the measured preference for training calls."""

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


def test_training_softmax_calls_go_to_pytorch_when_cudnn_is_faster(monkeypatch) -> None:
    if "triton" not in available_backends():
        pytest.skip("triton is not installed")
    from dilated_attention_pytorch.backends.triton import backend as triton_backend

    monkeypatch.setattr(triton_backend, "cudnn_usable", lambda *a: True)
    assert select_backend("auto", _call(requires_grad=True)).name == "pytorch"
    # Inference, head_split and padding masks measured faster (or only fast) on triton.
    assert select_backend("auto", _call(requires_grad=False)).name == "triton"
    assert select_backend("auto", _call(requires_grad=True, mixing="head_split")).name == "triton"
    assert select_backend("auto", _call(requires_grad=True, mask=True)).name == "triton"
    # Packed documents: one triton launch per branch beats one pytorch call per document.
    assert select_backend("auto", _call(requires_grad=True, packed=True)).name == "triton"
    monkeypatch.setattr(triton_backend, "cudnn_usable", lambda *a: False)
    assert select_backend("auto", _call(requires_grad=True)).name == "triton"
