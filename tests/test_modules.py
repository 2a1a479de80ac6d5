"""``DilatedAttention`` and ``MultiheadDilatedAttention`` against the dense oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dilated_attention_pytorch import (
    DilatedAttention,
    MultiheadDilatedAttention,
    dense_dilated_attention,
)

# Both sides compute in float64 here, so only roundoff separates them.
F64 = dict(atol=1e-10, rtol=1e-10)

# (segment_lengths, dilation_rates, num_heads): one and several branches, w % r != 0,
# r larger than H.
CONFIGS = [
    ([16], [1], 2),
    ([8, 32], [1, 4], 4),
    ([10, 25], [3, 7], 3),
]


def _padding_mask(B: int, N: int) -> Tensor:
    mask = torch.rand(B, N) < 0.3
    mask[0] = True  # a fully padded row: every query of batch 0 has no key and outputs 0
    return mask


@pytest.mark.parametrize("ws,rs,H", CONFIGS)
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_dilated_attention_matches_oracle(ws, rs, H, branch_mixing, is_causal, masked) -> None:
    B, N, D = 2, 45, 8
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = _padding_mask(B, N) if masked else None
    attn = DilatedAttention(ws, rs, branch_mixing=branch_mixing, scale=0.3)
    out = attn(q, k, v, is_causal=is_causal, key_padding_mask=mask)
    ref = dense_dilated_attention(
        q,
        k,
        v,
        ws,
        rs,
        is_causal=is_causal,
        branch_mixing=branch_mixing,
        scale=0.3,
        key_padding_mask=mask,
    )
    torch.testing.assert_close(out, ref, **F64)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **F64)


def _manual_multihead(
    m: MultiheadDilatedAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    is_causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The multi-head layer written out: projections, dense oracle, sub-LN, out projection."""
    B, N, E = query.shape
    H = m.num_heads
    q = F.linear(query, m.q_proj.weight, m.q_proj.bias).reshape(B, N, H, E // H)
    k = F.linear(key, m.k_proj.weight, m.k_proj.bias).reshape(B, N, H, E // H)
    v = F.linear(value, m.v_proj.weight, m.v_proj.bias).reshape(B, N, H, E // H)
    attn = m.attention
    x = dense_dilated_attention(
        q,
        k,
        v,
        attn.segment_lengths,
        attn.dilation_rates,
        is_causal=is_causal,
        branch_mixing=attn.branch_mixing,
        key_padding_mask=key_padding_mask,
    ).reshape(B, N, E)
    if m.layer_norm:
        x = F.layer_norm(x, (E,), m.norm.weight, m.norm.bias, m.norm.eps)
    return F.linear(x, m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("ws,rs,H", CONFIGS)
@pytest.mark.parametrize("branch_mixing", ["softmax", "head_split"])
@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_multihead_matches_manual_path(
    ws, rs, H, branch_mixing, layer_norm, is_causal, bias
) -> None:
    B, N, E = 2, 40, 4 * H
    m = MultiheadDilatedAttention(
        E,
        H,
        ws,
        rs,
        branch_mixing=branch_mixing,
        layer_norm=layer_norm,
        bias=bias,
        gamma_init=0.7,
        dtype=torch.float64,
    )
    if layer_norm:  # non-trivial affine parameters, so their gradients are exercised
        with torch.no_grad():
            m.norm.weight.normal_()
            m.norm.bias.normal_()
    query, key, value = (
        torch.randn(B, N, E, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    out, weights = m(query, key, value, is_causal=is_causal)
    assert weights is None
    ref = _manual_multihead(m, query, key, value, is_causal=is_causal)
    torch.testing.assert_close(out, ref, **F64)

    inputs = (query, key, value, *m.parameters())
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    ref_grads = torch.autograd.grad(ref, inputs, dout)
    names = ["query", "key", "value", *(n for n, _ in m.named_parameters())]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(
            g, rg, **F64, msg=lambda msg, name=name: f"grad of {name}: {msg}"
        )


def test_multihead_key_padding_mask_matches_manual_path() -> None:
    B, N, E, H = 3, 50, 16, 4
    m = MultiheadDilatedAttention(E, H, [8, 32], [1, 4], dtype=torch.float64)
    x = torch.randn(B, N, E, dtype=torch.float64)
    mask = _padding_mask(B, N)
    out, _ = m(x, key_padding_mask=mask)
    torch.testing.assert_close(out, _manual_multihead(m, x, x, x, key_padding_mask=mask), **F64)


def test_multihead_padded_keys_do_not_matter() -> None:
    B, N, E, H = 2, 33, 16, 4
    m = MultiheadDilatedAttention(E, H, [8, 16], [1, 2], dtype=torch.float64)
    query, memory = (torch.randn(B, N, E, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, N) < 0.4
    mask[:, 0] = False
    changed = memory.clone()
    changed[mask] = torch.randn_like(changed[mask]) * 100
    out, _ = m(query, memory, key_padding_mask=mask)
    out_changed, _ = m(query, changed, key_padding_mask=mask)
    torch.testing.assert_close(out, out_changed, **F64)


def test_multihead_self_attention_defaults() -> None:
    m = MultiheadDilatedAttention(16, 4, [8, 16], [1, 2], dtype=torch.float64)
    x, y = (torch.randn(2, 24, 16, dtype=torch.float64) for _ in range(2))
    # key and value default to query; value defaults to key.
    torch.testing.assert_close(m(x)[0], m(x, x, x)[0], atol=0, rtol=0)
    torch.testing.assert_close(m(x, y)[0], m(x, y, y)[0], atol=0, rtol=0)
    torch.testing.assert_close(m(x)[0], _manual_multihead(m, x, x, x), **F64)


def test_multihead_causal_ignores_the_future() -> None:
    m = MultiheadDilatedAttention(16, 4, [8, 16], [1, 2], dtype=torch.float64)
    x = torch.randn(1, 32, 16, dtype=torch.float64)
    future_changed = x.clone()
    future_changed[:, 20:] = torch.randn(1, 12, 16, dtype=torch.float64)
    out, _ = m(x, is_causal=True)
    out_changed, _ = m(future_changed, is_causal=True)
    torch.testing.assert_close(out[:, :20], out_changed[:, :20], **F64)
    assert not torch.allclose(out[:, 20:], out_changed[:, 20:])


def test_need_weights_raises() -> None:
    m = MultiheadDilatedAttention(16, 4, [8], [1])
    with pytest.raises(ValueError, match=r"need_weights=True is not supported.*never materialises"):
        m(torch.randn(1, 8, 16), need_weights=True)


def test_dropout_only_in_training() -> None:
    B, N, H, D = 2, 64, 4, 8
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    ref = dense_dilated_attention(q, k, v, [16, 32], [1, 2])
    attn = DilatedAttention([16, 32], [1, 2], dropout=0.5)
    attn.eval()
    torch.testing.assert_close(attn(q, k, v), ref, **F64)
    attn.train()
    dropped = attn(q, k, v)
    assert not torch.allclose(dropped, ref)
    # Dropout zeroes whole (query, key) probabilities and rescales the rest by 2,
    # so the output stays finite and of the same scale.
    assert torch.isfinite(dropped).all()
    # A module without dropout is identical in both modes.
    no_drop = DilatedAttention([16, 32], [1, 2]).train()
    torch.testing.assert_close(no_drop(q, k, v), ref, **F64)


def test_multihead_train_eval_reaches_attention() -> None:
    m = MultiheadDilatedAttention(16, 4, [8, 16], [1, 2], dropout=0.5, dtype=torch.float64)
    x = torch.randn(2, 32, 16, dtype=torch.float64)
    m.eval()
    assert not m.attention.training
    torch.testing.assert_close(m(x)[0], _manual_multihead(m, x, x, x), **F64)
    m.train()
    assert m.attention.training
    assert not torch.allclose(m(x)[0], _manual_multihead(m, x, x, x))


def test_attend_is_the_override_point() -> None:
    # The ring subclass overrides _attend only; everything else must go through it.
    seen: dict[str, object] = {}

    class Recording(MultiheadDilatedAttention):
        def _attend(self, q, k, v, *, is_causal, key_padding_mask):
            seen.update(shape=tuple(q.shape), is_causal=is_causal, mask=key_padding_mask)
            return super()._attend(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)

    torch.manual_seed(0)
    m = Recording(16, 4, [8], [1], dtype=torch.float64)
    torch.manual_seed(0)
    plain = MultiheadDilatedAttention(16, 4, [8], [1], dtype=torch.float64)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    out, _ = m(x, is_causal=True, key_padding_mask=mask)
    assert seen["shape"] == (2, 12, 4, 4) and seen["is_causal"] is True and seen["mask"] is mask
    # The plain module takes the fused projection path (recompute_qkv), which an
    # overridden _attend turns off: the same math in another order, so equal to float64
    # rounding, not bit for bit (the last bits differ with the CPU's matmul kernels).
    torch.testing.assert_close(out, plain(x, is_causal=True, key_padding_mask=mask)[0], **F64)


def test_parameter_names_and_factory_kwargs() -> None:
    m = MultiheadDilatedAttention(16, 4, [8], [1], dtype=torch.float64)
    assert sorted(n for n, _ in m.named_parameters()) == sorted(
        f"{proj}.{p}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj", "norm")
        for p in ("weight", "bias")
    )
    assert all(p.dtype == torch.float64 for p in m.parameters())
    no_ln = MultiheadDilatedAttention(16, 4, [8], [1], layer_norm=False, bias=False)
    assert isinstance(no_ln.norm, torch.nn.Identity) and not no_ln.layer_norm
    assert [n for n, _ in no_ln.named_parameters()] == [
        "q_proj.weight",
        "k_proj.weight",
        "v_proj.weight",
        "out_proj.weight",
    ]


def test_magneto_init() -> None:
    E, gamma = 512, 0.25
    m = MultiheadDilatedAttention(E, 8, [8], [1], gamma_init=gamma)
    xavier_std = (2.0 / (E + E)) ** 0.5
    # Each weight has E*E = 262144 normal samples: the std estimate's relative error is
    # about 1 / sqrt(2 * 262144) = 0.14%, so 2% is a wide margin.
    for proj, gain in (("q_proj", 1.0), ("k_proj", 1.0), ("v_proj", gamma), ("out_proj", gamma)):
        layer = getattr(m, proj)
        assert layer.weight.std().item() == pytest.approx(gain * xavier_std, rel=0.02), proj
        assert torch.count_nonzero(layer.bias) == 0
    assert torch.equal(m.norm.weight, torch.ones(E)) and torch.count_nonzero(m.norm.bias) == 0


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(embed_dim=30, num_heads=4),
            ValueError,
            r"embed_dim must be divisible by num_heads.*embed_dim=30",
        ),
        (dict(embed_dim=0, num_heads=4), ValueError, r"embed_dim must be a positive int, got 0"),
        (dict(embed_dim=16.0, num_heads=4), TypeError, r"embed_dim must be an int, got float"),
        (dict(num_heads=True), TypeError, r"num_heads must be an int, got bool"),
        (dict(gamma_init=0.0), ValueError, r"gamma_init must be a positive finite float, got 0.0"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout="0.1"), TypeError, r"dropout must be a float in \[0, 1\), got str"),
        (dict(scale=0.0), ValueError, r"scale must be a finite nonzero number"),
        (dict(backend="cudnn"), ValueError, r"unknown backend 'cudnn'; valid backends are"),
        (
            dict(branch_mixing="mean"),
            ValueError,
            r"branch_mixing must be one of \['softmax', 'head_split'\]",
        ),
        (dict(segment_lengths=[8, 16]), ValueError, r"must have the same length"),
        (
            dict(dilation_rates=[9]),
            ValueError,
            r"dilation rate 9 is larger than its segment length 8",
        ),
        (dict(segment_lengths=[]), ValueError, r"must be non-empty"),
    ],
)
def test_multihead_construction_errors(kwargs, error, match) -> None:
    args = dict(embed_dim=16, num_heads=4, segment_lengths=[8], dilation_rates=[1])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        MultiheadDilatedAttention(**args)


def test_dilated_attention_construction_errors() -> None:
    with pytest.raises(ValueError, match=r"dilation rate 4 is larger than its segment length 2"):
        DilatedAttention([2], [4])
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        DilatedAttention([8], [1], backend="fast")


@pytest.mark.parametrize(
    "shape,match",
    [
        (
            (8, 16),
            r"query must have shape \(B, N, E\) with E = embed_dim = 16 \(batch-first\), got \(8, 16\)",
        ),
        (
            (1, 8, 12),
            r"query must have shape \(B, N, E\) with E = embed_dim = 16.*got \(1, 8, 12\)",
        ),
    ],
)
def test_multihead_input_shape_errors(shape, match) -> None:
    m = MultiheadDilatedAttention(16, 4, [8], [1])
    with pytest.raises(ValueError, match=match):
        m(torch.randn(*shape))


def test_multihead_key_length_mismatch_is_reported() -> None:
    m = MultiheadDilatedAttention(16, 4, [8], [1])
    with pytest.raises(ValueError, match=r"k must have shape \(B, N, H_kv, D\).*cross-attention"):
        m(torch.randn(1, 8, 16), torch.randn(1, 9, 16))
