"""EnterpriseDistributedDilatedAttention: the multi-head layer with operations features."""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import (
    EnterpriseDistributedDilatedAttention,
    MultiheadDilatedAttention,
    create_multihead_dilated_attention,
)
from dilated_attention_pytorch.ring.distributed import (
    EnterpriseDistributedDilatedAttention as FromPackage,
)
from dilated_attention_pytorch.ring.distributed.ring_distributed_dilated_attention import (
    EnterpriseDistributedDilatedAttention as FromModule,
)

SEGMENTS, DILATIONS = [8, 16], [1, 2]
F64 = dict(atol=1e-12, rtol=1e-12)


def _pair(**kwargs):
    torch.manual_seed(0)
    plain = MultiheadDilatedAttention(32, 4, SEGMENTS, DILATIONS, dtype=torch.float64)
    layer = EnterpriseDistributedDilatedAttention(
        32, 4, SEGMENTS, DILATIONS, dtype=torch.float64, **kwargs
    )
    layer.load_state_dict(plain.state_dict())
    return plain, layer


@pytest.mark.parametrize("use_checkpointing", [False, True])
def test_is_the_multihead_layer(use_checkpointing: bool) -> None:
    plain, layer = _pair(use_checkpointing=use_checkpointing, enable_monitoring=True)
    x = torch.randn(2, 40, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    dy = torch.randn(2, 40, 32, dtype=torch.float64)
    want, none = plain(x, is_causal=True)
    got, none2 = layer(x2, is_causal=True)
    assert none is None and none2 is None
    torch.testing.assert_close(got, want, **F64)
    want.backward(dy)
    got.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, **F64)
    for (name, p), q in zip(layer.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **F64, msg=lambda m, n=name: f"{n}: {m}")
    stats = layer.get_communication_stats()
    # Calls of the layer's attention (a checkpointed recomputation is not a call).
    assert stats["calls"] == 1 and stats["bytes_sent"] == 0
    assert stats["compute_seconds"] > 0
    layer.reset_communication_stats()
    assert layer.get_communication_stats()["calls"] == 0


def test_options_and_errors() -> None:
    assert FromPackage is FromModule is EnterpriseDistributedDilatedAttention
    with pytest.warns(UserWarning, match="ring_size does not shard the sequence.*RingMultihead"):
        EnterpriseDistributedDilatedAttention(32, 4, SEGMENTS, DILATIONS, ring_size=4)
    layer = EnterpriseDistributedDilatedAttention(32, 4, SEGMENTS, DILATIONS)
    x = torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match="attn_mask is not supported.*key_padding_mask"):
        layer(x, attn_mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="enable_monitoring=True"):
        layer.get_communication_stats()


def test_factory_kinds(caplog: pytest.LogCaptureFixture) -> None:
    # The specification's call: nothing but the sizes; the default schedule is logged.
    layer = create_multihead_dilated_attention(
        "multihead_enterprise_distributed", embed_dim=768, num_heads=12
    )
    assert isinstance(layer, EnterpriseDistributedDilatedAttention)
    assert layer.attention.attention.segment_lengths == (2048, 4096, 8192)
    with pytest.warns(DeprecationWarning, match="RingDistributedDilatedAttention is deprecated"):
        old = create_multihead_dilated_attention(
            "multihead_ring_distributed", embed_dim=64, num_heads=4
        )
    assert isinstance(old, EnterpriseDistributedDilatedAttention)
