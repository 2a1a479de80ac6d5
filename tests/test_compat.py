"""Deprecated names: each warns, names its replacement, and computes what it computes."""

from __future__ import annotations

import importlib

import pytest
import torch

import dilated_attention_pytorch
from dilated_attention_pytorch import (
    DilatedAttention,
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    StandardRingAttention,
)

SEGMENTS, DILATIONS = [8, 16], [1, 2]
F64 = dict(atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    "name",
    [
        "RingDilatedAttentionV2",
        "RingDilatedAttentionV2Collective",
        "RingDilatedAttentionProduction",
    ],
)
def test_ring_aliases(name: str) -> None:
    with pytest.warns(
        DeprecationWarning, match=rf"{name} is deprecated; use .*StandardRingAttention"
    ):
        cls = getattr(dilated_attention_pytorch, name)
    with pytest.warns(
        DeprecationWarning, match=rf"{name} is deprecated; use .*StandardRingAttention"
    ):
        module = cls(
            SEGMENTS, DILATIONS, dropout=0.0, ring_size=1, device="cpu", dtype=torch.float32
        )
    assert isinstance(module, StandardRingAttention)
    q, k, v = (torch.randn(1, 32, 4, 8, dtype=torch.float64) for _ in range(3))
    want = DilatedAttention(SEGMENTS, DILATIONS)(q, k, v, is_causal=True)
    torch.testing.assert_close(module(q, k, v, is_causal=True), want, **F64)


@pytest.mark.parametrize("name", ["RingDilatedAttentionCorrect", "RingDilatedAttentionSDPA"])
def test_multihead_aliases(name: str) -> None:
    with pytest.warns(
        DeprecationWarning, match=rf"{name} is deprecated; use .*RingMultiheadDilatedAttention"
    ):
        cls = getattr(dilated_attention_pytorch, name)
    with pytest.warns(DeprecationWarning, match=name):
        layer = cls(segment_lengths=SEGMENTS, dilation_rates=DILATIONS, ring_size=1)
    assert isinstance(layer, RingMultiheadDilatedAttention)
    assert (layer.embed_dim, layer.num_heads) == (768, 12)  # the earlier API's defaults
    with pytest.warns(DeprecationWarning):
        small = cls(SEGMENTS, DILATIONS, embed_dim=32, num_heads=4, dtype=torch.float64)
    plain = MultiheadDilatedAttention(32, 4, SEGMENTS, DILATIONS, dtype=torch.float64)
    plain.load_state_dict(small.state_dict())
    x = torch.randn(2, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(small(x)[0], plain(x)[0], **F64)


def test_deprecated_module_path() -> None:
    module = importlib.import_module("dilated_attention_pytorch.ring_dilated_attention_v2")
    with pytest.warns(
        DeprecationWarning, match="ring_dilated_attention_v2.RingDilatedAttentionV2 is deprecated"
    ):
        cls = module.RingDilatedAttentionV2
    with pytest.warns(DeprecationWarning):
        assert isinstance(cls(SEGMENTS, DILATIONS), StandardRingAttention)
    with pytest.warns(
        DeprecationWarning, match="use dilated_attention_pytorch.ring.StandardRingAttention"
    ):
        from dilated_attention_pytorch.ring_dilated_attention_v2 import RingDilatedAttention
    assert RingDilatedAttention is StandardRingAttention


def test_unknown_names_still_raise() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        dilated_attention_pytorch.NoSuchThing  # noqa: B018


def test_hilbert_alias() -> None:
    from dilated_attention_pytorch import HilbertRingMultiheadAttention

    with pytest.warns(DeprecationWarning, match="use .*HilbertRingMultiheadAttention"):
        cls = dilated_attention_pytorch.RingDilatedAttentionHilbertGPUOptimized
    with pytest.warns(DeprecationWarning):
        layer = cls(segment_lengths=[8, 16], dilation_rates=[1, 2], use_hilbert=True)
    assert isinstance(layer, HilbertRingMultiheadAttention)
    assert (layer.embed_dim, layer.num_heads) == (768, 12)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="use_hilbert=False"):
        cls([8], [1], use_hilbert=False)
