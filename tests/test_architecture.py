"""The library's seams: one validation rule, layers that take their inner attention,
the factory's table and defaults, and the pure-PyTorch backend's kernel routing."""

from __future__ import annotations

import ast
import logging
import pathlib

import pytest
import torch
from torch import nn

import dilated_attention_pytorch
from dilated_attention_pytorch import (
    DilatedAttentionConfig,
    MultiheadDilatedAttention,
    PyTorchBackend,
    RingDilatedAttention,
    RingMultiheadDilatedAttention,
    create_dilated_attention,
    create_multihead_dilated_attention,
    dense_dilated_attention,
    dilated_attention,
    make_plan,
)
from dilated_attention_pytorch.backends import blocks
from dilated_attention_pytorch.dropout import DropoutKeys
from dilated_attention_pytorch.factory import DEFAULT_DILATION_RATES, DEFAULT_SEGMENT_LENGTHS

PACKAGE = pathlib.Path(dilated_attention_pytorch.__file__).parent
F64 = dict(atol=1e-10, rtol=1e-10)


# --- one validation rule: wrong type -> TypeError, wrong value -> ValueError ----------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: make_plan([8], [1], True), TypeError, "num_heads must be a positive int, got bool"),
        (lambda: make_plan([8], [1], 0), ValueError, "num_heads must be a positive int, got 0"),
        (lambda: make_plan([8], [1], 2, 5), TypeError, "branch_mixing must be one of"),
        (lambda: RingDilatedAttention([8], [1], ring_size=True), TypeError, "ring_size"),
        (lambda: RingDilatedAttention([8], [1], ring_size=0), ValueError, "ring_size"),
        (lambda: RingDilatedAttention([8], [1], validate="never"), ValueError, "validate"),
        (
            lambda: DilatedAttentionConfig.geometric(base_segment_length="8", num_branches=2),
            TypeError,
            "base_segment_length must be a positive int, got str",
        ),
        (lambda: MultiheadDilatedAttention(16, 4, [8], [1], bias=1), TypeError, "bias must be a bool"),
        (lambda: PyTorchBackend(kernel="cuda"), ValueError, r"kernel must be one of \['auto'"),
        (lambda: DilatedAttentionConfig(segment_lengths=[8], dilation_rates=[1], backend=3), TypeError, "backend must be a str"),
    ],
)  # fmt: skip
def test_same_mistake_same_exception(build, error, match) -> None:
    with pytest.raises(error, match=match):
        build()


def test_checks_live_in_validation_and_config_does_not_import_modules() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # No function-local imports (they hide import cycles).
                inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.name}:{node.lineno} imports inside {node.name}()"
    config_imports = {
        n.module
        for n in ast.walk(ast.parse((PACKAGE / "config.py").read_text()))
        if isinstance(n, ast.ImportFrom)
    }
    assert "modules" not in config_imports and "factory" not in config_imports
    for name in ("modules.py", "ring/standard.py"):
        imports = {
            n.module
            for n in ast.walk(ast.parse((PACKAGE / name).read_text()))
            if isinstance(n, ast.ImportFrom)
        }
        assert "factory" not in imports, f"{name} imports the factory"


# --- multi-head layers take their inner attention ------------------------------------


class _Recording(nn.Module):
    """An inner attention that records its call and returns v (a valid (B, N, H, D) map)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, object] = {}

    def forward(self, q, k, v, *, is_causal, key_padding_mask):
        self.seen = {"shape": tuple(q.shape), "is_causal": is_causal, "mask": key_padding_mask}
        return v


def test_multihead_layer_runs_the_attention_it_is_given() -> None:
    inner = _Recording()
    layer = MultiheadDilatedAttention(16, 4, attention=inner, dtype=torch.float64)
    assert layer.attention is inner
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    out, _ = layer(x, is_causal=True)
    assert inner.seen == {"shape": (2, 12, 4, 4), "is_causal": True, "mask": None}
    # attention = identity on v: out = out_proj(norm(v_proj(x))).
    want = layer.out_proj(layer.norm(layer.v_proj(x)))
    torch.testing.assert_close(out, want, **F64)


def test_multihead_layer_with_dilated_inner_matches_the_oracle() -> None:
    layer = MultiheadDilatedAttention(16, 4, [4, 8], [1, 2], dtype=torch.float64)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    q, k, v = (p(x).view(1, 20, 4, 4) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    att = dense_dilated_attention(q, k, v, [4, 8], [1, 2]).reshape(1, 20, 16)
    torch.testing.assert_close(layer(x)[0], layer.out_proj(layer.norm(att)), **F64)


def test_inner_attention_options_cannot_be_given_twice() -> None:
    with pytest.raises(ValueError, match=r"\['segment_lengths', 'dilation_rates', 'dropout'\]"):
        MultiheadDilatedAttention(16, 4, [8], [1], attention=_Recording(), dropout=0.1)
    with pytest.raises(TypeError, match="needs segment_lengths and dilation_rates"):
        MultiheadDilatedAttention(16, 4)
    with pytest.raises(TypeError, match="attention must be an nn.Module"):
        MultiheadDilatedAttention(16, 4, attention=lambda q, k, v: v)


def test_ring_multihead_is_thin() -> None:
    # It only builds its inner ring attention: no override of the parent's methods.
    own = set(vars(RingMultiheadDilatedAttention)) - {"__doc__", "__module__", "__qualname__"}
    assert own == {"__init__"}, own


# --- the factory's table and defaults ---------------------------------------------------


def test_factory_fills_in_the_default_schedule(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dilated_attention_pytorch"):
        layer = create_multihead_dilated_attention("multihead_dilated", embed_dim=64, num_heads=4)
    assert layer.attention.segment_lengths == DEFAULT_SEGMENT_LENGTHS == (2048, 4096, 8192)
    assert layer.attention.dilation_rates == DEFAULT_DILATION_RATES == (1, 2, 4)
    assert "using the defaults segment_lengths=[2048, 4096, 8192]" in caplog.text
    attn = create_dilated_attention("dilated")
    assert attn.segment_lengths == (2048, 4096, 8192)
    # An explicit schedule is used as given, without the log line.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dilated_attention_pytorch"):
        attn = create_dilated_attention("dilated", segment_lengths=[8], dilation_rates=[1])
    assert attn.segment_lengths == (8,) and "defaults" not in caplog.text


# --- the pytorch backend: an explicit kernel option, and its routing rule ----------------


def test_kernel_option_is_explicit() -> None:
    q, k, v = (torch.randn(1, 24, 2, 8, dtype=torch.float64) for _ in range(3))
    want = dense_dilated_attention(q, k, v, [8, 24], [1, 2])
    got = dilated_attention(q, k, v, [8, 24], [1, 2], backend=PyTorchBackend(kernel="math"))
    torch.testing.assert_close(got, want, **F64)
    with pytest.raises(ValueError, match=r"backend 'pytorch' cannot run this call: .*cuda"):
        dilated_attention(q, k, v, [8], [1], backend=PyTorchBackend(kernel="flash"))


def test_fused_ops_never_get_blocks_they_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend to be on a GPU with both fused ops available: the rule alone decides.
    monkeypatch.setattr(blocks, "cudnn_usable", lambda *a: True)
    monkeypatch.setattr(blocks, "flash_supported_reasons", lambda *a: [])
    one, two = torch.empty(4, 1, 2, 64), torch.empty(4, 2, 2, 64)
    keep = torch.ones(4, 2, dtype=torch.bool)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    dropout = DropoutKeys(0.1, 0, ids, ids, torch.arange(2))
    assert blocks.block_kernel(two, two, None, None) == "cudnn"
    # cuDNN fails on one-token blocks ("s_q = s_kv = 1 is not supported").
    assert blocks.block_kernel(one, one, None, None) == "flash"
    assert blocks.block_kernel(one, two, None, None, "cudnn") == "flash"
    assert blocks.block_kernel(two, one, None, None) == "flash"
    # Masks and dropout are computed by the math path only.
    assert blocks.block_kernel(two, two, keep, None) == "math"
    assert blocks.block_kernel(two, two, None, dropout, "cudnn") == "math"
    assert blocks.block_kernel(two, two, None, None, "flash") == "flash"
    assert blocks.block_kernel(two, two, None, None, "math") == "math"
    monkeypatch.setattr(blocks, "flash_supported_reasons", lambda *a: ["no flash"])
    assert blocks.block_kernel(one, one, None, None) == "math"


def test_one_token_segments_are_routed_in_a_real_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # w == r gives one-token dilated segments; record the kernel chosen for each block.
    chosen = []
    rule = blocks.block_kernel

    def recording(q, k, *args, **kwargs):
        kernel = rule(q, k, *args, **kwargs)
        chosen.append((q.shape[1], k.shape[1], kernel))
        return kernel

    monkeypatch.setattr(blocks, "block_kernel", recording)
    q, k, v = (torch.randn(1, 16, 4, 8, dtype=torch.float64) for _ in range(3))
    got = dilated_attention(q, k, v, [4, 4], [1, 4], backend="pytorch")
    torch.testing.assert_close(got, dense_dilated_attention(q, k, v, [4, 4], [1, 4]), **F64)
    assert (1, 1, "math") in chosen  # on CPU every block takes the math path
