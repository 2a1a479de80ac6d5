"""RingAttentionConfig, create_ring_attention and its presets."""

from __future__ import annotations

import logging

import pytest
import torch

from dilated_attention_pytorch import (
    RING_PRESETS,
    DilatedAttention,
    DistributedRingAttention,
    HilbertRingAttention,
    RingAttentionConfig,
    StandardRingAttention,
    create_ring_attention,
    create_ring_attention_from_preset,
)


def test_config_round_trip_and_validation() -> None:
    cfg = RingAttentionConfig(
        segment_lengths=[64, 128], dilation_rates=[1, 2], dropout=0.1, ring_size=4,
        use_hilbert=True, hilbert_curve_level=5, enable_monitoring=True, timeout=30,
        validate="always", backend="pytorch",
    )  # fmt: skip
    assert cfg.segment_lengths == (64, 128) and cfg.timeout == 30.0
    assert RingAttentionConfig.from_dict(cfg.to_dict()) == cfg
    assert RingAttentionConfig.from_dict(RingAttentionConfig().to_dict()) == RingAttentionConfig()
    with pytest.raises(ValueError, match="dilation rate 4 is larger than its segment length 2"):
        RingAttentionConfig(segment_lengths=[2], dilation_rates=[4])
    with pytest.raises(ValueError, match="hilbert_curve_level=3 only applies to Hilbert order"):
        RingAttentionConfig(hilbert_curve_level=3)
    with pytest.raises(TypeError, match="use_checkpointing must be a bool"):
        RingAttentionConfig(use_checkpointing="yes")
    with pytest.raises(
        TypeError, match=r"unknown RingAttentionConfig field\(s\) \['memory_pool'\]"
    ):
        RingAttentionConfig.from_dict({"memory_pool": True})
    with pytest.raises(TypeError):
        RingAttentionConfig([64], [1])  # keyword-only


def test_factory_kinds_and_auto(caplog: pytest.LogCaptureFixture) -> None:
    assert type(create_ring_attention("standard")) is StandardRingAttention
    with caplog.at_level(logging.INFO, logger="dilated_attention_pytorch"):
        auto = create_ring_attention(config=RingAttentionConfig(use_hilbert=True))
    assert type(auto) is HilbertRingAttention and "chose 'hilbert'" in caplog.text
    monitored = create_ring_attention(enable_monitoring=True)
    assert type(monitored) is DistributedRingAttention and monitored.enable_monitoring
    assert type(create_ring_attention()) is StandardRingAttention
    # The quick reference's call: world_size is another name of ring_size.
    assert create_ring_attention("standard", world_size=4).ring_size == 4
    with pytest.raises(ValueError, match=r"unknown ring implementation 'fast'; valid ones are"):
        create_ring_attention("fast")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['memory_pool'\]"):
        create_ring_attention("standard", memory_pool=True)
    with pytest.raises(
        ValueError, match=r"\['enable_monitoring'\] are not features of the 'block_sparse'"
    ):
        create_ring_attention(sparsity_ratio=0.9, enable_monitoring=True)
    with pytest.raises(ValueError, match="features of the 'distributed' implementation"):
        create_ring_attention("standard", use_checkpointing=True)
    with pytest.raises(ValueError, match="world_size=2 and ring_size=4 disagree"):
        create_ring_attention("standard", world_size=2, ring_size=4)


def test_presets_change_what_the_module_does() -> None:
    dev = create_ring_attention_from_preset("development")
    assert type(dev) is DistributedRingAttention
    assert (
        dev.enable_monitoring and dev.validate == "always" and dev.segment_lengths == (2048, 4096)
    )
    prod = create_ring_attention_from_preset("production")
    assert type(prod) is StandardRingAttention and prod.validate == "once"
    large = create_ring_attention_from_preset("large_scale")
    assert type(large) is DistributedRingAttention and large.use_checkpointing
    assert not large.enable_monitoring and large.dilation_rates == (1, 2, 4, 8)
    hil = create_ring_attention_from_preset("hilbert_optimized")
    assert type(hil) is HilbertRingAttention
    assert set(RING_PRESETS) == {"development", "production", "large_scale", "hilbert_optimized"}
    with pytest.raises(ValueError, match="unknown ring preset 'fastest'"):
        create_ring_attention_from_preset("fastest")


def test_built_modules_compute_dilated_attention() -> None:
    # Without torch.distributed every ring module is a ring of one: the single-device result.
    q, k, v = (torch.randn(1, 64, 4, 8, dtype=torch.float64) for _ in range(3))
    overrides = dict(segment_lengths=[16, 64], dilation_rates=[1, 4])
    want = DilatedAttention([16, 64], [1, 4])(q, k, v, is_causal=True)
    for preset in ("development", "production", "large_scale"):
        module = create_ring_attention_from_preset(preset, **overrides)
        torch.testing.assert_close(module(q, k, v, is_causal=True), want, atol=1e-12, rtol=1e-12)


def test_module_memory_estimate_is_the_specifications_check() -> None:
    module = StandardRingAttention(segment_lengths=[1024], dilation_rates=[1], ring_size=4)
    estimate = module.get_memory_estimate(seq_len=8192, batch_size=1, num_heads=8, head_dim=64)
    assert estimate["mode"] == "ring" and estimate["ring_size"] == 4
    assert estimate["memory_reduction_factor"] == pytest.approx(4, rel=0.1)
    one = StandardRingAttention([1024], [1]).get_memory_estimate(8192, 1, 8, 64)
    assert one["ring_size"] == 1 and one["memory_reduction_factor"] == pytest.approx(1.0)
