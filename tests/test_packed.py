"""Packed documents: ``cu_seqlens`` (flash-attn's convention) on a ``(1, total, H, D)`` batch.

Each document is its own sequence: segments restart at its first token, its last
segment may be shorter, and nothing attends across documents. The dense oracle builds
that from the definition (document ids and in-document positions in its count mask);
float64 results match it to 1e-10 as in tests/test_functional.py.
"""

from __future__ import annotations

import pytest
import torch

from dilated_attention_pytorch import (
    MultiheadDilatedAttention,
    dense_dilated_attention,
    dilated_attention,
)

TOL = dict(atol=1e-10, rtol=1e-10)
LENGTHS = [13, 0, 40, 7, 1, 21]  # an empty document, a one-token one, ragged segments


def _packed(lengths, H=4, H_kv=4, D=8, dtype=torch.float64):
    total = sum(lengths)
    q = torch.randn(1, total, H, D, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, total, H_kv, D, dtype=dtype, requires_grad=True) for _ in range(2))
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return q, k, v, torch.tensor(offsets, dtype=torch.int32)


@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_the_oracle(branch_mixing, is_causal, kv_heads) -> None:
    torch.manual_seed(kv_heads + 2 * is_causal)
    q, k, v, cu = _packed(LENGTHS, H_kv=kv_heads)
    kw = dict(is_causal=is_causal, branch_mixing=branch_mixing)
    out, lse = dilated_attention(
        q, k, v, [8, 16], [1, 2], cu_seqlens=cu, max_seqlen=40, return_lse=True, **kw
    )
    ref, ref_lse = dense_dilated_attention(
        q, k, v, [8, 16], [1, 2], cu_seqlens=cu, return_lse=True, **kw
    )
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(lse, ref_lse.float())
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL, msg=lambda m, n=name: f"d{n}: {m}")


def test_nothing_crosses_a_document_boundary() -> None:
    torch.manual_seed(0)
    q, k, v, cu = _packed([24, 24])
    out = dilated_attention(q, k, v, [16, 32], [1, 2], cu_seqlens=cu)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, 24:] += 10.0  # change the second document's keys and values only
    v2[:, 24:] -= 3.0
    out2 = dilated_attention(q, k2, v2, [16, 32], [1, 2], cu_seqlens=cu)
    assert torch.equal(out[:, :24], out2[:, :24])
    assert not torch.allclose(out[:, 24:], out2[:, 24:])
    # The second document's segments start at its own first token: it equals a call on
    # that document alone (16 does not divide the packed offset 24).
    alone = dilated_attention(q[:, 24:], k2[:, 24:], v2[:, 24:], [16, 32], [1, 2])
    torch.testing.assert_close(out2[:, 24:], alone, **TOL)


def test_dropout_draws_one_seed_per_document_in_order() -> None:
    torch.manual_seed(1)
    q, k, v, cu = _packed([10, 30, 5])
    torch.manual_seed(5)
    packed = dilated_attention(q, k, v, [8, 16], [1, 2], dropout_p=0.3, cu_seqlens=cu)
    torch.manual_seed(5)
    bounds = cu.tolist()
    parts = [
        dilated_attention(q[:, a:b], k[:, a:b], v[:, a:b], [8, 16], [1, 2], dropout_p=0.3)
        for a, b in zip(bounds, bounds[1:])
    ]
    torch.testing.assert_close(packed, torch.cat(parts, 1), **TOL)


def test_multihead_layer_passes_cu_seqlens_on() -> None:
    torch.manual_seed(2)
    layer = MultiheadDilatedAttention(32, 4, [8, 16], [1, 2], num_kv_heads=2, dtype=torch.float64)
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    cu = torch.tensor([0, 12, 30])
    out, _ = layer(x, is_causal=True, cu_seqlens=cu)
    first, _ = layer(x[:, :12], is_causal=True)
    second, _ = layer(x[:, 12:], is_causal=True)
    torch.testing.assert_close(out, torch.cat([first, second], 1), **TOL)


def test_bad_cu_seqlens_say_what_to_do() -> None:
    q, k, v, cu = _packed([4, 4])
    mask = torch.zeros(1, 8, dtype=torch.bool)
    call = lambda **kw: dilated_attention(q, k, v, [4], [1], **kw)  # noqa: E731
    with pytest.raises(ValueError, match="key_padding_mask and cu_seqlens cannot be combined"):
        call(cu_seqlens=cu, key_padding_mask=mask)
    with pytest.raises(TypeError, match="cu_seqlens must be a 1-D int32 or int64 tensor"):
        call(cu_seqlens=[0, 4, 8])
    with pytest.raises(ValueError, match="got shape \\(3,\\) and dtype torch.float32"):
        call(cu_seqlens=cu.float())
    with pytest.raises(ValueError, match="must start at 0 and end at the packed length 8"):
        call(cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="must not decrease, got 6 then 4"):
        call(cu_seqlens=torch.tensor([0, 6, 4, 8]))
    with pytest.raises(ValueError, match="max_seqlen=3 is shorter than the longest document"):
        call(cu_seqlens=cu, max_seqlen=3)
    with pytest.raises(ValueError, match="max_seqlen=-1 is shorter than the longest document"):
        call(cu_seqlens=cu, max_seqlen=-1)
    with pytest.raises(TypeError, match="max_seqlen must be an int .*got float 4.0"):
        call(cu_seqlens=cu, max_seqlen=4.0)
    call(cu_seqlens=cu, max_seqlen=torch.tensor(4))  # flash-attn callers pass a tensor
    with pytest.raises(ValueError, match="max_seqlen is the longest document of cu_seqlens"):
        call(max_seqlen=4)
    q2, k2, v2 = (torch.randn(2, 8, 4, 8) for _ in range(3))
    with pytest.raises(ValueError, match="one batch row \\(1, total, H, D\\)"):
        dilated_attention(q2, k2, v2, [4], [1], cu_seqlens=cu)
